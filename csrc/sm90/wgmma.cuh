// wgmma.mma_async m64nNk16 with float32 accumulators, for the N and element types the
// Hopper kernels use (N = 16, 32: the ETAP kernel's query rows; 64: the wide kernel's keys;
// 256: the wide kernel's value channels). The PTX names the type in the opcode and lists
// every accumulator register, so each (type, N) is its own specialisation, stamped out by
// the macros below. Layout of d for thread t of the
// warpgroup (PTX ISA, "wgmma .m64nNk16 register fragment layout for accumulator matrix
// D"): with w = t / 32, g = t % 32 / 4, q = t % 4, register d[4j + e] holds row
// 16w + g + 8 * (e / 2), column 8j + 2q + e % 2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jax_etap {
namespace sm90 {

// D (64 x kN) = A (64 x 16) * B (16 x kN) (+ D when accumulate). A is K-major, or M-major
// when kTransA is 1; B is K-major. desc_a/desc_b: shared-memory matrix descriptors.
template <typename T, int kN>
struct Wgmma;

// Accumulator operand lists: the registers %0.. in the asm string and their constraints.
#define ETAP_D8_REGS "%0, %1, %2, %3, %4, %5, %6, %7"
#define ETAP_D16_REGS ETAP_D8_REGS ", %8, %9, %10, %11, %12, %13, %14, %15"
#define ETAP_D32_REGS                                                                                         \
  ETAP_D16_REGS ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define ETAP_D8 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define ETAP_D16                                                                                              \
  ETAP_D8, "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define ETAP_D32                                                                                              \
  ETAP_D16, "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),      \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
      "+f"(d[31])

// FIRST: the operand number of desc_a, which follows the N / 2 accumulators.
#define ETAP_WGMMA(CTYPE, PTX_TYPE, N, REGS, ACCUMULATORS, FIRST, SECOND, THIRD, FOURTH)                      \
  template <>                                                                                                 \
  struct Wgmma<CTYPE, N> {                                                                                    \
    template <int kTransA>                                                                                    \
    static __device__ __forceinline__ void mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,          \
                                               bool accumulate) {                                             \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #THIRD ", 0;\n"                                       \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " {" REGS "}, %" #FIRST \
                   ", %" #SECOND ", p, 1, 1, %" #FOURTH ", 0;\n}\n"                                                \
                   : ACCUMULATORS                                                                             \
                   : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(kTransA));                            \
    }                                                                                                         \
  };

ETAP_WGMMA(__nv_bfloat16, "bf16", 16, ETAP_D8_REGS, ETAP_D8, 8, 9, 10, 11)
ETAP_WGMMA(__nv_bfloat16, "bf16", 32, ETAP_D16_REGS, ETAP_D16, 16, 17, 18, 19)
ETAP_WGMMA(__nv_bfloat16, "bf16", 64, ETAP_D32_REGS, ETAP_D32, 32, 33, 34, 35)
ETAP_WGMMA(__half, "f16", 16, ETAP_D8_REGS, ETAP_D8, 8, 9, 10, 11)
ETAP_WGMMA(__half, "f16", 32, ETAP_D16_REGS, ETAP_D16, 16, 17, 18, 19)
ETAP_WGMMA(__half, "f16", 64, ETAP_D32_REGS, ETAP_D32, 32, 33, 34, 35)

#undef ETAP_WGMMA
#undef ETAP_D32
#undef ETAP_D16
#undef ETAP_D8
#undef ETAP_D32_REGS
#undef ETAP_D16_REGS
#undef ETAP_D8_REGS

// D (64 x 256) = A (64 x 16) * B (16 x 256) (+ D when accumulate), float32 accumulators:
// the wide kernel's P.V, with B (the values, channels contiguous) N-major when kTransB is
// 1. mma_rs takes A from registers: the P tile's fragment, four 16-bit pairs a thread in
// the layout of PTX ISA "wgmma .m64nNk16 register fragment layout for matrix A" (register
// i holds row 16w + g + 8 * (i % 2), columns 2q + 8 * (i / 2) and the next); mma_ss from
// a K-major shared-memory tile (desc_a).
template <typename T>
struct WgmmaN256;

#define ETAP_D128_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, " \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, " \
  "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, " \
  "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, " \
  "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, " \
  "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define ETAP_D128 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
  "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
  "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
  "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
  "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), \
  "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), \
  "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), \
  "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), \
  "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), \
  "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), \
  "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), \
  "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), \
  "+f"(d[127])

#define ETAP_WGMMA_N256(CTYPE, PTX_TYPE)                                                                      \
  template <>                                                                                                 \
  struct WgmmaN256<CTYPE> {                                                                                   \
    template <int kTransB>                                                                                    \
    static __device__ __forceinline__ void mma_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b,   \
                                                  bool accumulate) {                                          \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                              \
                   "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX_TYPE "." PTX_TYPE " {" ETAP_D128_REGS     \
                   "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"                                     \
                   : ETAP_D128                                                                                \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)),           \
                     "n"(kTransB));                                                                           \
    }                                                                                                         \
    template <int kTransB>                                                                                    \
    static __device__ __forceinline__ void mma_ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b,          \
                                                  bool accumulate) {                                          \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                              \
                   "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX_TYPE "." PTX_TYPE " {" ETAP_D128_REGS     \
                   "}, %128, %129, p, 1, 1, 0, %131;\n}\n"                                                     \
                   : ETAP_D128                                                                                \
                   : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(kTransB));                           \
    }                                                                                                         \
  };

ETAP_WGMMA_N256(__nv_bfloat16, "bf16")
ETAP_WGMMA_N256(__half, "f16")

#undef ETAP_WGMMA_N256
#undef ETAP_D128
#undef ETAP_D128_REGS

}  // namespace sm90
}  // namespace jax_etap
