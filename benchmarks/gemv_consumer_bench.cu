// The CUDA GEMV's consumers alone (layers/cuda_gemv.cu): how many SM cycles a stage of rows
// takes once its bytes are in shared memory, for several ways of splitting the stage over the
// eight consumer warps. Standalone (no torch), one GPU, seconds:
//
//     nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/gemv_consumer benchmarks/gemv_consumer_bench.cu
//     /tmp/gemv_consumer
//
// The CTA's shape and the barrier, bulk-copy and fma8 helpers are the kernel's own
// (layers/cuda_gemv_device.cuh, which needs no torch), so this builds in seconds.
// Each CTA (one per SM, 9 warps as the kernel has) runs the consumer protocol of the kernel over
// a ring of stages: warp 8's lane 0 plays the producer (waits for a slot to be released, then
// either marks it full, the bytes already there from a fill at the start ("resident"), or
// bulk-copies the stage's rows into it as the kernel does, from a 0.2 MB weight buffer that
// stays in L2 ("from L2": the shared memory also takes the copies' writes)); the eight consumer
// warps wait for each stage, reduce its rows against the operand and release it. Every result
// is checked against an fp64 host reference. Printed per variant, shape and feed: SM cycles a
// stage (the CTAs' mean of their slowest warp), the equivalent us, and the rate a CTA reduces
// weights at (GB/s; the weight stream from HBM gives an SM ~36 GB/s on an H200).
//
// Variants (docs/benchmarks.md, twenty-first session, asks for these):
//   0 row/warp  - as cuda_gemv.cu: row j of a stage to warp j % 8, 4 accumulators, warp sum,
//                 lane 0 stores;
//   1 2 rows    - two rows a warp at once (stages of 16 rows): one load of the operand for both;
//   2 K split   - each warp a K slice of every row of the stage, the rows' partial sums reduced
//                 in the warp together (9 shuffles for 8 rows), then across warps through shared
//                 memory once a stage (one named barrier);
//   3 mma       - as 2, the products by mma.sync m16n8k16 (bf16 in, fp32 accumulate): the rows
//                 are the B operand, the operand the A operand; no widening, no warp sum;
//   4 mma xreg  - as 3 with the warp's slice of the operand held in registers (K <= 2048).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../src/pagedllm/layers/cuda_gemv_device.cuh"  // the kernel's shape, barriers, bulk copies, row products

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

constexpr int kBarOffset = 0;        // full[32], empty[32]: 512 bytes
constexpr int kPartialOffset = 512;  // 2 x [8 warps][16 rows] floats: 1024 bytes
constexpr int kOperandOffset = 1536;

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Eight values a lane (one per row) summed over the warp: after it, lane l holds the sum of row
// ((l >> 4) & 1) * 4 + ((l >> 3) & 1) * 2 + ((l >> 2) & 1). Each step sends half of what it keeps.
__device__ __forceinline__ float warp_sum8(float (&v)[8], int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const bool up = lane & 16;
    const float mine = up ? v[i + 4] : v[i];
    v[i] = mine + __shfl_xor_sync(0xffffffffu, up ? v[i] : v[i + 4], 16);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool up = lane & 8;
    const float mine = up ? v[i + 2] : v[i];
    v[i] = mine + __shfl_xor_sync(0xffffffffu, up ? v[i] : v[i + 2], 8);
  }
  {
    const bool up = lane & 4;
    const float mine = up ? v[1] : v[0];
    v[0] = mine + __shfl_xor_sync(0xffffffffu, up ? v[0] : v[1], 4);
  }
  float s = v[0];
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  return s;
}

struct Args {
  const __nv_bfloat16* w;  // [slots * rows, K]: the ring's contents
  const __nv_bfloat16* x;  // [K]
  float* out;              // [grid, stages, rows]
  unsigned long long* clocks;  // [grid, 3]: slowest warp's cycles, ns of the loop, cycles of warp 0
  int K, rows, slots, stages;
  int copy;  // 1: the producer bulk-copies every stage (from L2); 0: the bytes stay from the fill
};

template <int VARIANT>
__global__ void __launch_bounds__(kThreads, 1) consumer_kernel(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
  uint64_t* empty = full + 32;
  float* partial = reinterpret_cast<float*>(smem + kPartialOffset);
  const int K = a.K, R = a.rows, S = a.slots, kv = K / 8;
  const int ring_offset = kOperandOffset + (K * 2 + 127) / 128 * 128;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + kOperandOffset);
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem + ring_offset);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // the bytes, once
  for (int v = tid; v < kv; v += kThreads) reinterpret_cast<uint4*>(xs)[v] = reinterpret_cast<const uint4*>(a.x)[v];
  const int ring_vecs = S * R * kv;
  for (int v = tid; v < ring_vecs; v += kThreads)
    reinterpret_cast<uint4*>(ring)[v] = reinterpret_cast<const uint4*>(a.w)[v];
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // before the bulk copies overwrite them
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kWarps) {  // the producer: marks a stage full once its slot is free
    if (lane != 0) return;
    for (int st = 0; st < a.stages; ++st) {
      const int slot = st % S;
      if (st >= S) mbar_wait(&empty[slot], ((st / S) - 1) & 1);
      if (a.copy) {
        const uint32_t bytes = static_cast<uint32_t>(R) * K * 2;
        mbar_expect_tx(&full[slot], bytes);
        bulk_load(ring + static_cast<int64_t>(slot) * R * K, a.w + static_cast<int64_t>(slot) * R * K, bytes,
                  &full[slot]);
      } else {
        mbar_arrive(&full[slot]);
      }
    }
    return;
  }

  const uint4* xv = reinterpret_cast<const uint4*>(xs);
  uint4 xr[VARIANT == 4 ? 8 : 1];  // VARIANT 4: lane (g, t)'s operand vectors, once for every stage
  if constexpr (VARIANT == 4) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int v = warp * 4 + i * kWarps * 4 + (lane & 3);
      xr[i] = v < kv ? xv[v] : make_uint4(0, 0, 0, 0);
    }
  }
  float* out = a.out + static_cast<int64_t>(blockIdx.x) * a.stages * R;
  consumers_sync();
  const unsigned long long c0 = clock64(), t0 = now_ns();
  for (int st = 0; st < a.stages; ++st) {
    const int slot = st % S;
    mbar_wait(&full[slot], (st / S) & 1);
    const __nv_bfloat16* ws = ring + static_cast<int64_t>(slot) * R * K;
    if constexpr (VARIANT == 0) {  // as cuda_gemv.cu
      const int first = st * R;
      for (int j = ((warp - first % kWarps) + kWarps) % kWarps; j < R; j += kWarps) {
        const uint4* wrow = reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(j) * K);
        const float sum = warp_sum(row_partial(wrow, xv, kv, lane));
        if (lane == 0) out[st * R + j] = sum;
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
    } else if constexpr (VARIANT == 1) {  // two rows a warp at once: rows j and j + 8
      for (int j = warp; j < R; j += 2 * kWarps) {
        const bool second = j + kWarps < R;
        const uint4* r0 = reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(j) * K);
        const uint4* r1 = reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(second ? j + kWarps : j) * K);
        // four accumulators a row as in variant 0 (the same sums), one operand load for both rows
        float p[4] = {0.f, 0.f, 0.f, 0.f}, q[4] = {0.f, 0.f, 0.f, 0.f};
        int v = lane;
        for (; v + 96 < kv; v += 128) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const uint4 xa = xv[v + 32 * u];
            fma8(r0[v + 32 * u], xa, p[u]);
            fma8(r1[v + 32 * u], xa, q[u]);
          }
        }
        for (; v < kv; v += 32) {
          const uint4 xa = xv[v];
          fma8(r0[v], xa, p[0]);
          fma8(r1[v], xa, q[0]);
        }
        float s0 = (p[0] + p[1]) + (p[2] + p[3]), s1 = (q[0] + q[1]) + (q[2] + q[3]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {  // both sums' shuffles side by side
          s0 += __shfl_xor_sync(0xffffffffu, s0, o);
          s1 += __shfl_xor_sync(0xffffffffu, s1, o);
        }
        if (lane == 0) {
          out[st * R + j] = s0;
          if (second) out[st * R + j + kWarps] = s1;
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
    } else {  // 2, 3: each warp a K slice of every row (rows <= 8), partials through shared memory
      float* part = partial + (st & 1) * kWarps * 16;
      if constexpr (VARIANT == 2) {
        float acc[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) acc[r] = 0.f;
        for (int v = warp * 32 + lane; v < kv; v += kWarps * 32) {
          const uint4 x4 = xv[v];
#pragma unroll
          for (int r = 0; r < 8; ++r)
            if (r < R) fma8(reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(r) * K)[v], x4, acc[r]);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[slot]);
        const float s = warp_sum8(acc, lane);
        if ((lane & 3) == 0) part[warp * 16 + (((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1))] = s;
      } else {
        // mma m16n8k16: B column n = row n of the stage (lane g = lane / 4 loads row g), A = the
        // operand in every row. A lane (g, t) loads 8 weights of row g at k = base + 8t and the 8
        // operand values there; the first 4 feed one mma, the last 4 the next (a k permutation
        // both operands share). C[m][n] is then row n's partial for every m: c[0], c[1] of lane
        // (0, t) are rows 2t and 2t + 1.
        const int g = lane >> 2, t = lane & 3;
        float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};  // two chains of mmas
        const bool has_row = g < R;
        const uint4* wrow = reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(has_row ? g : 0) * K);
        auto step = [&](int base, float (&c)[4]) {  // 4 vectors (32 k) of the warp's slice
          const int v = base + t;
          uint4 w4 = make_uint4(0, 0, 0, 0), x4 = make_uint4(0, 0, 0, 0);
          if (v < kv) {
            x4 = xv[v];
            if (has_row) w4 = wrow[v];
          }
          mma_bf16(c, x4.x, x4.x, x4.y, x4.y, w4.x, w4.y);
          mma_bf16(c, x4.z, x4.z, x4.w, x4.w, w4.z, w4.w);
        };
        if constexpr (VARIANT == 4) {  // the warp's operand slice from registers (up to 8 steps)
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int v = warp * 4 + i * kWarps * 4 + t;
            const uint4 w4 = has_row && v < kv ? wrow[v] : make_uint4(0, 0, 0, 0);
            if (i & 1) {  // i is known here (unrolled): two chains of mmas
              mma_bf16(c1, xr[i].x, xr[i].x, xr[i].y, xr[i].y, w4.x, w4.y);
              mma_bf16(c1, xr[i].z, xr[i].z, xr[i].w, xr[i].w, w4.z, w4.w);
            } else {
              mma_bf16(c0, xr[i].x, xr[i].x, xr[i].y, xr[i].y, w4.x, w4.y);
              mma_bf16(c0, xr[i].z, xr[i].z, xr[i].w, xr[i].w, w4.z, w4.w);
            }
          }
        } else {
          for (int base = warp * 4; base < kv; base += 2 * kWarps * 4) {
            step(base, c0);
            step(base + kWarps * 4, c1);
          }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[slot]);
        if (g == 0) {
          part[warp * 16 + 2 * t] = c0[0] + c1[0];
          part[warp * 16 + 2 * t + 1] = c0[1] + c1[1];
        }
      }
      consumers_sync();
      if (warp == st % kWarps && lane < R) {  // one warp a stage sums the warps' partials, in order
        float y = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) y += part[w * 16 + lane];
        out[st * R + lane] = y;
      }
    }
  }
  const unsigned long long c1 = clock64(), t1 = now_ns();
  __shared__ unsigned long long slowest;
  if (tid == 0) slowest = 0;
  consumers_sync();
  atomicMax(&slowest, c1 - c0);
  consumers_sync();
  if (tid == 0) {
    a.clocks[blockIdx.x * 3] = slowest;
    a.clocks[blockIdx.x * 3 + 1] = t1 - t0;
    a.clocks[blockIdx.x * 3 + 2] = c1 - c0;
  }
}

struct Shape {
  const char* name;
  int K, rows, slots;
};

template <int VARIANT>
void run(const Shape& sh, int sms, int stages, const std::vector<float>& wf, const std::vector<float>& xf,
         const __nv_bfloat16* dw, const __nv_bfloat16* dx, const char* label, int copy) {
  // what each variant serves
  if ((VARIANT >= 2 && sh.rows > 8) || (VARIANT == 1 && sh.rows < 16) || (VARIANT == 4 && sh.K > 2048)) return;
  const int smem = kOperandOffset + (sh.K * 2 + 127) / 128 * 128 + sh.slots * sh.rows * sh.K * 2;
  CHECK(cudaFuncSetAttribute(consumer_kernel<VARIANT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  float* dout;
  unsigned long long* dclk;
  CHECK(cudaMalloc(&dout, sizeof(float) * sms * stages * sh.rows));
  CHECK(cudaMalloc(&dclk, sizeof(unsigned long long) * sms * 3));
  Args a{dw, dx, dout, dclk, sh.K, sh.rows, sh.slots, stages, copy};
  for (int rep = 0; rep < 3; ++rep) consumer_kernel<VARIANT><<<sms, kThreads, smem>>>(a);  // the last one counts
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> out(static_cast<size_t>(sms) * stages * sh.rows);
  std::vector<unsigned long long> clk(static_cast<size_t>(sms) * 3);
  CHECK(cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(clk.data(), dclk, clk.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  // fp64 reference of every row of the ring; every stage of every CTA must match its slot's rows
  double worst = 0.0, scale = 0.0;
  std::vector<double> ref(static_cast<size_t>(sh.slots) * sh.rows);
  for (size_t r = 0; r < ref.size(); ++r) {
    double s = 0.0;
    for (int k = 0; k < sh.K; ++k) s += static_cast<double>(wf[r * sh.K + k]) * xf[k];
    ref[r] = s;
    scale = std::fmax(scale, std::fabs(s));
  }
  for (int b = 0; b < sms; ++b)
    for (int st = 0; st < stages; ++st)
      for (int r = 0; r < sh.rows; ++r) {
        const double want = ref[static_cast<size_t>(st % sh.slots) * sh.rows + r];
        worst = std::fmax(worst, std::fabs(out[(static_cast<size_t>(b) * stages + st) * sh.rows + r] - want));
      }
  double cycles = 0.0, ns = 0.0;
  for (int b = 0; b < sms; ++b) {
    cycles += clk[b * 3];
    ns += clk[b * 3 + 1];
  }
  cycles /= sms * static_cast<double>(stages);
  ns /= sms * static_cast<double>(stages);
  const double gbs = sh.rows * sh.K * 2.0 / ns;  // bytes a ns = GB/s
  std::printf("%-11s %-9s %-12s %8.0f cycles/stage %7.3f us/stage %7.1f GB/s a CTA  max err %.1e of %.1e %s\n",
              sh.name, copy ? "from L2" : "resident", label, cycles, ns / 1e3, gbs, worst, scale,
              worst <= 1e-3 * scale + 1e-6 ? "ok" : "WRONG");
  CHECK(cudaFree(dout));
  CHECK(cudaFree(dclk));
}

}  // namespace

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int stages = 240;
  const Shape shapes[] = {
      {"O TP=2", 2048, 8, 6},     // 4096 x 2048: 8 rows of 4 KB, as the plan gives it
      {"O TP=2 x16", 2048, 16, 3},  // the same rows, 16 a stage (for 2 rows a warp)
      {"QKV TP=2", 4096, 4, 6},   // 3072 x 4096
      {"O TP=1", 4096, 4, 6},     // 4096 x 4096
      {"down TP=2", 7168, 2, 6},  // 4096 x 7168
  };
  for (const Shape& sh : shapes) {
    const size_t ring = static_cast<size_t>(sh.slots) * sh.rows * sh.K;
    std::vector<float> wf(ring), xf(sh.K);
    std::vector<__nv_bfloat16> wb(ring), xb(sh.K);
    uint64_t seed = 12345;
    auto rnd = [&]() {  // uniform in [-1, 1), rounded to bf16
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      return static_cast<float>(static_cast<int64_t>(seed >> 40) - (1ll << 23)) / (1 << 23);
    };
    for (size_t i = 0; i < ring; ++i) {
      wb[i] = __float2bfloat16(rnd() * 0.05f);
      wf[i] = __bfloat162float(wb[i]);
    }
    for (int k = 0; k < sh.K; ++k) {
      xb[k] = __float2bfloat16(rnd());
      xf[k] = __bfloat162float(xb[k]);
    }
    __nv_bfloat16 *dw, *dx;
    CHECK(cudaMalloc(&dw, ring * 2));
    CHECK(cudaMalloc(&dx, sh.K * 2));
    CHECK(cudaMemcpy(dw, wb.data(), ring * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dx, xb.data(), sh.K * 2, cudaMemcpyHostToDevice));
    for (int copy = 0; copy < 2; ++copy) {
      run<0>(sh, sms, stages, wf, xf, dw, dx, "0 row/warp", copy);
      run<1>(sh, sms, stages, wf, xf, dw, dx, "1 2 rows", copy);
      run<2>(sh, sms, stages, wf, xf, dw, dx, "2 K split", copy);
      run<3>(sh, sms, stages, wf, xf, dw, dx, "3 mma", copy);
      run<4>(sh, sms, stages, wf, xf, dw, dx, "4 mma xreg", copy);
    }
    CHECK(cudaFree(dw));
    CHECK(cudaFree(dx));
  }
  return 0;
}
