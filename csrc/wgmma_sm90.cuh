// wgmma.mma_async m64nNk16 with both operands in shared memory and float32 accumulators,
// for the N (query rows per CTA) and element types the ETAP kernel uses. The PTX names the
// type in the opcode and lists every accumulator register, so each (type, N) is its own
// specialisation, stamped out by ETAP_WGMMA below. Layout of d for thread t of the
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

}  // namespace sm90
}  // namespace jax_etap
