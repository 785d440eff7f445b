// The tensor-core rate of the kernels' wgmma shapes on their own, from shared memory that
// is already there (no loads, no softmax): what one or two warpgroups reach when each
// issues a group of wgmmas and waits for it, as the kernels do.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I csrc experiments/wgmma_rate.cu -o /tmp/wgmma_rate
//   /tmp/wgmma_rate
// One CTA per SM; every CTA runs the same groups; TFLOP/s over the whole GPU from CUDA
// events (the median of 5 launches after a warm-up), and each warpgroup's cycles a group
// from clock64 (the median over the CTAs of the last launch).
// Its first run (H200, 2026-12-02, 925ec5d) read the score groups above the card's rated
// peak; every group now accumulates, and events and clock64 agree (2026-12-02, f8dd2f2: 2048
// multiply-adds a cycle per SM at most, the rated peak). The last two shapes run the
// kernels' own score_tile: with a per-thread stage (ptxas then serialises its wgmmas,
// C7520) and at a constant one (uniform descriptors).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "sm90/pipeline.cuh"
#include "sm90/primitives.cuh"
#include "sm90/wgmma.cuh"

using namespace jax_etap::sm90;
using T = __nv_bfloat16;

namespace {

// A group: the wgmmas a kernel issues before it waits, on K-major 128-byte-swizzled tiles.
enum class Shape {
  kScores64,      // the wide kernel's scores: 36 x m64n64k16, A and B in shared memory
  kScores64Two,   // the same, k16 steps alternating between two accumulators
  kScores64Rs,    // the same with A (the queries) from registers
  kScores256,     // 36 x m64n256k16 SS, B K-major: scores of 256 keys an instruction
  kScores32,      // the ETAP kernel's S^T at 32 rows: 36 x m64n32k16
  kScores16,      // ... at 16 rows: 36 x m64n16k16
  kValues256Rs,   // the wide kernel's P.V with its own P: 4 x m64n256k16, A from registers
  kValues256Ss,   // ... with the other warpgroup's P: 4 x m64n256k16, A in shared memory
  kTileScores,    // the wide kernel's own score_tile (sm90/pipeline.cuh): 9 boxes of 4
                  // m64n64k16, each behind its (completed) kv_full barrier, at a stage the
                  // compiler cannot prove warp-uniform (as in the kernels)
  kTileScoresConstStage,  // the same at stage 0, a constant
};

constexpr int kTileBytes = 8192;  // 64 rows x 128 bytes
// The kernels' stages and query tile (score_tile's shapes), then their kv_full barriers.
constexpr int kSmemBytes = (kStages + 1) * kMaxKBoxes * kTileBytes;
// Asked for at launch: more than half an SM's 228 KiB, so that one CTA runs on each SM.
constexpr int kLaunchSmemBytes = kSmemBytes + kStages * kMaxKBoxes * 8;
constexpr int kGroups = 4000;

template <Shape kShape>
struct Group;

// m64n64k16 with A from registers (the sm90/wgmma.cuh wrappers have it from shared memory).
__device__ __forceinline__ void mma_n64_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)));
}

// A fragment of small bf16 values, for the register-A shapes.
struct Fragment {
  uint32_t a[4][4];
  __device__ Fragment() {
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[k][i] = 0x3c003c00u ^ (threadIdx.x * 2654435761u >> (8 + i + k));
  }
};

// kChains accumulators of kRegisters floats a thread; issue(acc) puts one group of
// wgmmas in flight on them, then the group is committed and waited for. Every wgmma adds
// to its accumulator (they start at zero), as in the P.V groups, which alone read
// plausibly in the first run, when the score groups began by overwriting theirs.
template <int kChains, int kRegisters>
struct Accumulators {
  float acc[kChains][kRegisters] = {};

  template <typename Issue>
  __device__ void group(Issue&& issue) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) pin_registers(acc[c]);
    wgmma_fence();
    issue(acc);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int c = 0; c < kChains; ++c) pin_registers(acc[c]);
  }
  __device__ float sum() const {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < kChains; ++c)
#pragma unroll
      for (int i = 0; i < kRegisters; ++i) s += acc[c][i];
    return s;
  }
};

// Descriptors of k16 step `step` of a 36-step score group: two A tiles (the queries) and
// two B tiles (the keys) taken in turn, as the boxes of a tile.
__device__ __forceinline__ uint64_t queries_at(unsigned char* smem, int step) {
  return matrix_descriptor(smem + (step / 4 % 2) * kTileBytes + step % 4 * 32, 0, 1024);
}
__device__ __forceinline__ uint64_t keys_at(unsigned char* smem, int step) {
  return matrix_descriptor(smem + (2 + step / 4 % 2) * kTileBytes + step % 4 * 32, 0, 1024);
}
constexpr int kScoreSteps = 36;

// 36 x m64nNk16 SS, the k16 steps in turn on kChains accumulators.
template <int kN, int kChains>
struct ScoresGroup : Accumulators<kChains, kN / 2> {
  static constexpr double kMacs = double(kScoreSteps) * 64 * kN * 16;
  __device__ void run(unsigned char* smem) {
    this->group([&](auto& acc) {
#pragma unroll
      for (int step = 0; step < kScoreSteps; ++step)
        Wgmma<T, kN>::template mma<0>(acc[step % kChains], queries_at(smem, step), keys_at(smem, step), true);
    });
  }
};

// 36 x m64n64k16 with A from registers.
struct ScoresRsGroup : Accumulators<1, 32>, Fragment {
  static constexpr double kMacs = double(kScoreSteps) * 64 * 64 * 16;
  __device__ void run(unsigned char* smem) {
    group([&](auto& acc) {
#pragma unroll
      for (int step = 0; step < kScoreSteps; ++step) mma_n64_rs(acc[0], a[step % 4], keys_at(smem, step), true);
    });
  }
};

// 36 x m64n256k16 SS, B K-major: 256 keys of 128-byte rows, 8-row groups 1024 bytes apart.
struct Scores256Group : Accumulators<1, 128> {
  static constexpr double kMacs = double(kScoreSteps) * 64 * 256 * 16;
  __device__ void run(unsigned char* smem) {
    group([&](auto& acc) {
#pragma unroll
      for (int step = 0; step < kScoreSteps; ++step)
        WgmmaN256<T>::template mma_ss<0>(acc[0], queries_at(smem, step),
                                         matrix_descriptor(smem + 2 * kTileBytes + step % 4 * 32, 0, 1024), true);
    });
  }
};

// 4 x m64n256k16: P.V over 64 keys, V's 256 channels N-major in four 64-channel boxes
// 8 KiB apart (the kernel's layout), P from registers or shared memory.
template <bool kPFromRegisters>
struct ValuesGroup : Accumulators<1, 128>, Fragment {
  static constexpr double kMacs = 4.0 * 64 * 256 * 16;
  __device__ void run(unsigned char* smem) {
    group([&](auto& acc) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t values = matrix_descriptor(smem + 2 * kTileBytes + k * 16 * 128, kTileBytes, 1024);
        if constexpr (kPFromRegisters)
          WgmmaN256<T>::template mma_rs<1>(acc[0], a[k], values, true);
        else
          WgmmaN256<T>::template mma_ss<1>(acc[0], matrix_descriptor(smem + k * 32, 0, 1024), values, true);
      }
    });
  }
};

// What score_tile needs of the kernels' shared memory: two stages of 9 key boxes, the
// query tile's 9 boxes, a kv_full barrier per stage's box (completed once at the start,
// so every wait at parity 0 passes at once).
struct TileSmem {
  unsigned char* base;
  __device__ unsigned char* kv_box(int stage, int box) const { return base + (stage * kMaxKBoxes + box) * kTileBytes; }
  __device__ unsigned char* q_box(int box) const { return base + (kStages * kMaxKBoxes + box) * kTileBytes; }
  __device__ uint64_t* kv_full(int stage, int box) const {
    return reinterpret_cast<uint64_t*>(base + kSmemBytes) + stage * kMaxKBoxes + box;
  }
};
__constant__ int c_k_boxes = kMaxKBoxes;  // a value the compiler cannot unroll by
__device__ int g_stages[256];  // zeros

template <bool kConstStage>
struct TileScoresGroup : Accumulators<1, 32> {
  static constexpr double kMacs = double(kScoreSteps) * 64 * 64 * 16;
  __device__ void run(unsigned char* smem) {
    // 0, but each thread's own load, like the kernels' stage, which follows their tile
    // counts along the pieces each thread reads.
    const int stage = kConstStage ? 0 : g_stages[threadIdx.x];
    score_tile<T, 64, false>(TileSmem{smem}, stage, 0, c_k_boxes, acc[0]);
  }
};

template <> struct Group<Shape::kScores64> : ScoresGroup<64, 1> {};
template <> struct Group<Shape::kScores64Two> : ScoresGroup<64, 2> {};
template <> struct Group<Shape::kScores64Rs> : ScoresRsGroup {};
template <> struct Group<Shape::kScores256> : Scores256Group {};
template <> struct Group<Shape::kScores32> : ScoresGroup<32, 1> {};
template <> struct Group<Shape::kScores16> : ScoresGroup<16, 1> {};
template <> struct Group<Shape::kValues256Rs> : ValuesGroup<true> {};
template <> struct Group<Shape::kValues256Ss> : ValuesGroup<false> {};
template <> struct Group<Shape::kTileScores> : TileScoresGroup<false> {};
template <> struct Group<Shape::kTileScoresConstStage> : TileScoresGroup<true> {};

template <Shape kShape>
__global__ void __launch_bounds__(256, 1) rate_kernel(float* sink, long long* cycles) {
  extern __shared__ __align__(1024) unsigned char smem[];
  // Small random bf16 values, so the products are not all zeros.
  for (int i = threadIdx.x; i < kSmemBytes / 4; i += blockDim.x) {
    const uint32_t h = (i + 1) * 2654435761u;
    reinterpret_cast<uint32_t*>(smem)[i] = (0x3c00u | (h >> 26)) | ((0x3c00u | (h >> 20 & 63)) << 16);
  }
  if (threadIdx.x < kStages * kMaxKBoxes) {
    uint64_t* full = TileSmem{smem}.kv_full(0, threadIdx.x);
    mbarrier_init(full, 1);
    mbarrier_arrive(full);  // phase 0 complete
  }
  fence_proxy_async();
  __syncthreads();
  Group<kShape> group;
  const long long start = clock64();
  for (int g = 0; g < kGroups; ++g) group.run(smem);
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + threadIdx.x / 128] = clock64() - start;
  const float s = group.sum();
  if (s == 1234.5f) sink[threadIdx.x] = s;  // keeps the products alive; never true in practice
}

#define CHECK(call)                                                                        \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_));   \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// The median of the warpgroups' clock64 spans over the CTAs (`warpgroups` of each).
double median_cycles(const std::vector<long long>& cycles, int warpgroups) {
  std::vector<long long> spans;
  for (size_t i = 0; i < cycles.size(); ++i)
    if (int(i % 2) < warpgroups) spans.push_back(cycles[i]);
  std::sort(spans.begin(), spans.end());
  return double(spans[spans.size() / 2]);
}

template <Shape kShape>
void measure(const char* name, int sms, float* sink, long long* cycles) {
  auto kernel = rate_kernel<kShape>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kLaunchSmemBytes));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int warpgroups = 1; warpgroups <= 2; ++warpgroups) {
    std::vector<float> ms;
    for (int run = 0; run < 6; ++run) {
      CHECK(cudaEventRecord(start));
      kernel<<<sms, 128 * warpgroups, kLaunchSmemBytes>>>(sink, cycles);
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      float t = 0.f;
      CHECK(cudaEventElapsedTime(&t, start, stop));
      if (run > 0) ms.push_back(t);  // run 0 warms up
    }
    std::sort(ms.begin(), ms.end());
    const double seconds = ms[ms.size() / 2] / 1e3;
    const double flops = 2.0 * Group<kShape>::kMacs * kGroups * warpgroups * sms;
    std::vector<long long> spans(2 * sms);  // the last run's
    CHECK(cudaMemcpy(spans.data(), cycles, spans.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    const double group_cycles = median_cycles(spans, warpgroups) / kGroups;
    const double macs_per_cycle = Group<kShape>::kMacs * warpgroups / group_cycles;
    std::printf("| %-44s | %d | %8.1f | %7.0f | %6.0f |\n", name, warpgroups, flops / seconds / 1e12, group_cycles,
                macs_per_cycle);
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
}

}  // namespace

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  float* sink = nullptr;
  long long* cycles = nullptr;
  CHECK(cudaMalloc(&sink, 256 * sizeof(float)));
  CHECK(cudaMalloc(&cycles, 2 * sms * sizeof(long long)));
  CHECK(cudaMemset(cycles, 0, 2 * sms * sizeof(long long)));
  std::printf("%s, %d SMs; one CTA per SM, %d groups per warpgroup\n", prop.name, sms, kGroups);
  // The SM's rated dense bf16 rate is 2048 multiply-adds a cycle (989 TFLOP/s at 1.83 GHz
  // on 132 SMs): the last column can be read against it.
  std::printf("| group (each warpgroup: issue, commit, wait) | warpgroups | TFLOP/s (events) | cycles a group "
              "(clock64) | multiply-adds a cycle, SM |\n");
  std::printf("|---|---|---|---|---|\n");
  measure<Shape::kScores64>("scores: 36 x m64n64k16 SS", sms, sink, cycles);
  measure<Shape::kScores64Two>("scores: 36 x m64n64k16 SS, two accumulators", sms, sink, cycles);
  measure<Shape::kScores64Rs>("scores: 36 x m64n64k16 RS", sms, sink, cycles);
  measure<Shape::kScores256>("scores: 36 x m64n256k16 SS (256 keys)", sms, sink, cycles);
  measure<Shape::kScores32>("scores: 36 x m64n32k16 SS", sms, sink, cycles);
  measure<Shape::kScores16>("scores: 36 x m64n16k16 SS", sms, sink, cycles);
  measure<Shape::kValues256Rs>("values: 4 x m64n256k16 RS", sms, sink, cycles);
  measure<Shape::kValues256Ss>("values: 4 x m64n256k16 SS", sms, sink, cycles);
  measure<Shape::kTileScores>("score_tile: 9 x (kv_full wait, 4 x m64n64k16)", sms, sink, cycles);
  measure<Shape::kTileScoresConstStage>("score_tile at a constant stage", sms, sink, cycles);
  CHECK(cudaFree(sink));
  CHECK(cudaFree(cycles));
  return 0;
}
