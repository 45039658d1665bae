// One decode token's attention and output projection in one kernel (attention/cuda_decode_o.py
// builds and calls it).
//
// At batch 1 the attention reads a few hundred KB and the O projection streams its weight; as two
// kernels (cuda_decode.cu, then layers/cuda_gemv.cu) a layer paid, from the QKV projection's end:
// the attention kernel's launch (~2 us, a cluster kernel after a grid's completion), its round
// trips (~4-6 us, its loads queued behind the O projection's weight prefetch), the O GEMV's wait
// for the attention grid and its operand (~1.4 us), then the rest of O's weight stream (~4-5 us
// past its operand): ~15 us on 2 x H200 at TP=2 (docs/benchmarks.md, twentieth session). Here:
//  - The grid is made of thread-block clusters of CL = (KV heads) x S CTAs; within a cluster CTA
//    (h, s) attends over split s of KV head h's context (warp w of split s takes the chunks
//    c = (s * 8 + w) mod (S * 8)). Each cluster computes the whole attention output: every
//    cluster does the same (tiny) attention again, so no CTA ever waits for another cluster.
//  - The CTAs' partials are combined through distributed shared memory, each CTA building the
//    whole attention output (every head) as its GEMV operand in its own shared memory.
//  - One producer warp per CTA streams the CTA's slab of O rows into a ring of shared-memory
//    stages (bulk copies) from the kernel's first instant, since the weights need nothing the
//    QKV projection writes; the consumers reduce the rows against the operand as in cuda_gemv.cu
//    and store them, or push them into every rank's buffer of the all-reduce site (cuda_gemv.cu
//    explains the tagged words and counts; the add + RMSNorm GEMV after this kernel sums them).
//  - Launched with programmatic dependent launch after the QKV projection: the consumers wait
//    for it (griddepcontrol.wait) only before the query and this step's key and value.
//
// Only cluster 0 writes this step's key and value into the cache (every cluster computes them).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace cg = cooperative_groups;

namespace {

constexpr int kDim = 128;
constexpr int kWarps = 8;                    // consumer warps
constexpr int kThreads = (kWarps + 1) * 32;  // + the producer warp
constexpr int kConsumers = kWarps * 32;
constexpr int kMaxCluster = 16;
constexpr int kMaxSplits = 8;
constexpr int kMaxSlots = 32;
constexpr int kMaxWorld = 8;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kEmptyOffset = 256;
constexpr int kMiscOffset = 512;
constexpr int kOperandOffset = 1024;

template <int GP>
constexpr int kChunk = GP >= 4 ? 32 / GP : 8;

struct Params {
  // attention (one decode token: token 0)
  const __nv_bfloat16* q;
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
  const int64_t* seq_lens;
  const int64_t* block_tables;
  const __nv_bfloat16* new_k;
  const __nv_bfloat16* new_v;
  const int64_t* slot_mapping;
  const int64_t* positions;
  const float* cos;
  const float* sin;
  int64_t stride_qh, stride_cb, stride_ct, stride_ch, stride_nkh, stride_nvh, stride_cos;
  float scale_log2;
  int max_blocks, page, group, num_heads, splits;
  int write_kv, rope;
  // the O projection
  const __nv_bfloat16* w;
  __nv_bfloat16* out;
  int N, K, rows_per_stage, num_slots, ring_offset, ahead;
  // 0: the weight stream starts at once (`ahead`: stages in flight until the operand is in);
  // 1 / 2: only `ahead` stages until every consumer warp has its query (1) or is through its
  // chunks (2), then the rest: the attention's loads do not queue behind the weights.
  int go;
  void* push[kMaxWorld];
  unsigned long long* site_epoch;
  int num_push, rank, world;
  unsigned long long* stamps;  // per CTA: start, operand ready, rows done, attention done; null: off
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ bool mbar_test(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory"); }
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long ld_volatile(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_word(void* p, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void red_add_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ void fma8(const uint4 w4, const uint4 x4, float& acc) {
  const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&w4);
  const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&x4);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 wf = __bfloat1622float2(wp[j]);
    const float2 xf = __bfloat1622float2(xp[j]);
    acc = fmaf(wf.x, xf.x, acc);
    acc = fmaf(wf.y, xf.y, acc);
  }
}
__device__ __forceinline__ void unpack4(const uint2 r, float (&f)[4]) {
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r.y));
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
}
__device__ __forceinline__ uint2 pack4(const float (&f)[4]) {
  uint2 r;
  *reinterpret_cast<__nv_bfloat162*>(&r.x) = __floats2bfloat162_rn(f[0], f[1]);
  *reinterpret_cast<__nv_bfloat162*>(&r.y) = __floats2bfloat162_rn(f[2], f[3]);
  return r;
}
__device__ __forceinline__ uint2 ld2(const __nv_bfloat16* p) { return *reinterpret_cast<const uint2*>(p); }
__device__ __forceinline__ uint2 rotate(const uint2 raw, const float4 c, const float4 s, int lane) {
  float x[4], partner[4];
  unpack4(raw, x);
  uint2 other;
  other.x = __shfl_xor_sync(kFull, raw.x, 16);
  other.y = __shfl_xor_sync(kFull, raw.y, 16);
  unpack4(other, partner);
  const float cs[4] = {c.x, c.y, c.z, c.w}, sn[4] = {s.x, s.y, s.z, s.w};
  const bool lower = lane < 16;
  float y[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) y[j] = lower ? x[j] * cs[j] - partner[j] * sn[j] : x[j] * cs[j] + partner[j] * sn[j];
  return pack4(y);
}
template <int N, int O>
__device__ __forceinline__ void lane_reduce(float* v, int lane) {
  if constexpr (O >= 1) {
    if constexpr (N > 1) {
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        const float send = upper ? v[i] : v[i + N / 2];
        const float keep = upper ? v[i + N / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(kFull, send, O);
      }
      lane_reduce<N / 2, O / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFull, v[0], O);
      lane_reduce<1, O / 2>(v, lane);
    }
  }
}
template <int N>
__device__ __forceinline__ int reduced_entry(int lane) {
  int e = 0, n = N;
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    if (n > 1) {
      if (lane & o) e += n / 2;
      n /= 2;
    }
  }
  return e;
}

template <int GP>
__global__ void __launch_bounds__(kThreads, 1) decode_o_kernel(const Params p) {
  constexpr int T = kChunk<GP>;
  constexpr int NS = T * GP;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(16) float s_scores[kWarps][NS];
  __shared__ float s_m[kWarps][GP], s_l[kWarps][GP];
  __shared__ float4 s_acc[kWarps][GP][32];
  __shared__ float c_m[GP], c_l[GP];  // this CTA's partial, read by the cluster
  __shared__ float4 c_acc[GP][32];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + kEmptyOffset);
  volatile int* operand_ready = reinterpret_cast<volatile int*>(smem + kMiscOffset);
  int* go_count = reinterpret_cast<int*>(smem + kMiscOffset + 16);  // consumer warps past the go point
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + kOperandOffset);
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem + p.ring_offset);

  cg::cluster_group cluster = cg::this_cluster();
  const int CL = static_cast<int>(cluster.num_blocks());
  const int crank = static_cast<int>(cluster.block_rank());
  const int cluster_id = blockIdx.x / CL;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = p.rows_per_stage, S = p.num_slots;
  const int64_t stage_elems = static_cast<int64_t>(R) * p.K;
  // This CTA's slab of O rows, in chunks of R rows.
  const int total_chunks = (p.N + R - 1) / R;
  const int per_cta = (total_chunks + gridDim.x - 1) / gridDim.x;
  const int first_chunk = blockIdx.x * per_cta;
  const int my_chunks = max(0, min(per_cta, total_chunks - first_chunk));

  if (tid == 0) {
    if (p.stamps) p.stamps[blockIdx.x * 4] = now_ns();
    *operand_ready = 0;
    *go_count = 0;
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kWarps) {  // the producer warp
    cluster_arrive_relaxed();  // barrier 1 (the partials): the producer has nothing to publish
    if (lane == 0) {
      asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
      int landed = 0;
      for (int st = 0; st < my_chunks; ++st) {
        const int slot = st % S;
        if (st >= S) mbar_wait(&empty[slot], ((st / S) - 1) & 1);
        if (p.go) {
          if (st >= p.ahead) while (*reinterpret_cast<volatile int*>(go_count) < kWarps) {}
        } else {
          while (p.ahead && st - landed >= p.ahead && !*operand_ready) {
            if (mbar_test(&full[landed % S], (landed / S) & 1)) ++landed;
          }
        }
        const int chunk = first_chunk + st;
        const int rows_in = min(R, p.N - chunk * R);
        const uint32_t bytes = static_cast<uint32_t>(rows_in) * p.K * 2;
        mbar_expect_tx(&full[slot], bytes);
        bulk_load(ring + slot * stage_elems, p.w + static_cast<int64_t>(chunk) * R * p.K, bytes, &full[slot]);
      }
    }
    __syncwarp();
    cluster_wait();
    cluster_arrive_relaxed();  // barrier 2 (the partials read)
    cluster_wait();
    return;
  }

  // ---- attention: KV head h, split s of its context ----
  const int h = crank / p.splits, split = crank % p.splits;
  const int gw = split * kWarps + warp, nw = p.splits * kWarps;
  const int seq_len = static_cast<int>(p.seq_lens[0]);
  const int64_t* bt_row = p.block_tables;
  auto block_of = [&](int j) -> int64_t {
    const int idx = (gw + j * nw) * T / p.page;
    return idx < p.max_blocks ? bt_row[idx] : -1;
  };
  int64_t blocks = block_of(lane);
  int64_t slot = -1, pos = 0;
  if (p.write_kv) slot = p.slot_mapping[0];
  if (p.rope) pos = p.positions[0];
  const int num_chunks = (seq_len + T - 1) / T;
  const int newest = p.write_kv ? seq_len - 1 : -1;
  uint2 kr[T], vr[T], kn[T], vn[T];  // this warp's next two chunks, loaded one iteration ahead of
  // the one before (a warp walks 2-3 chunks here: each load round trip would otherwise show)
  auto load_chunk = [&](int c, int64_t block, uint2 (&k)[T], uint2 (&v)[T]) {
    const int64_t base = block * p.stride_cb + h * p.stride_ch + lane * 4;
    const int first = (c * T) % p.page;
#pragma unroll
    for (int i = 0; i < T; ++i) {
      const int64_t at = base + (first + i) * p.stride_ct;
      k[i] = ld2(p.k_cache + at);
      v[i] = ld2(p.v_cache + at);
    }
  };
  if (gw < num_chunks) load_chunk(gw, __shfl_sync(kFull, blocks, 0), kr, vr);
  if (gw + nw < num_chunks) load_chunk(gw + nw, __shfl_sync(kFull, blocks, 1), kn, vn);
  float4 rope_cos = make_float4(0.f, 0.f, 0.f, 0.f), rope_sin = rope_cos;
  if (p.rope) {
    rope_cos = *reinterpret_cast<const float4*>(p.cos + pos * p.stride_cos + lane * 4);
    rope_sin = *reinterpret_cast<const float4*>(p.sin + pos * p.stride_cos + lane * 4);
  }

  asm volatile("griddepcontrol.wait;" ::: "memory");  // the QKV projection's output
  // The site's calls (stable from this writer's start to its reader's end): the tag of the rows.
  const unsigned long long site_calls = p.site_epoch != nullptr ? ld_volatile(p.site_epoch) : 0;
  uint2 qraw[GP];
#pragma unroll
  for (int g = 0; g < GP; ++g)
    qraw[g] = g < p.group ? ld2(p.q + (h * p.group + g) * p.stride_qh + lane * 4) : make_uint2(0u, 0u);
  uint2 new_k = make_uint2(0u, 0u), new_v = make_uint2(0u, 0u);
  if (p.write_kv) {
    new_k = ld2(p.new_k + h * p.stride_nkh + lane * 4);
    new_v = ld2(p.new_v + h * p.stride_nvh + lane * 4);
  }
  float qf[GP][4];
  if (p.rope) {
#pragma unroll
    for (int g = 0; g < GP; ++g) qraw[g] = rotate(qraw[g], rope_cos, rope_sin, lane);
    if (p.write_kv) new_k = rotate(new_k, rope_cos, rope_sin, lane);
  }
#pragma unroll
  for (int g = 0; g < GP; ++g) unpack4(qraw[g], qf[g]);
  auto go_point = [&](int level) {
    if (p.go == level) {
      __syncwarp();
      if (lane == 0) atomicAdd(go_count, 1);
    }
  };
  go_point(1);
  if (cluster_id == 0 && newest >= 0 && slot >= 0 && (newest / T) % nw == gw) {
    const int64_t at = (slot / p.page) * p.stride_cb + (slot % p.page) * p.stride_ct + h * p.stride_ch + lane * 4;
    *reinterpret_cast<uint2*>(p.k_cache + at) = new_k;
    *reinterpret_cast<uint2*>(p.v_cache + at) = new_v;
  }

  float m[GP], l[GP], acc[GP][4];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[g][j] = 0.f;
  }
  int j = 0;
  for (int c = gw; c < num_chunks; c += nw, ++j) {
    uint2 k2[T], v2[T];
    const int next = c + 2 * nw;
    if (next < num_chunks) {
      if ((j + 2) % 32 == 0) blocks = block_of(j + 2 + lane);
      load_chunk(next, __shfl_sync(kFull, blocks, (j + 2) % 32), k2, v2);
    }
    const int first = c * T;
#pragma unroll
    for (int i = 0; i < T; ++i) {
      if (first + i == newest) {
        kr[i] = new_k;
        vr[i] = new_v;
      }
    }
    float s[NS];
#pragma unroll
    for (int i = 0; i < T; ++i) {
      float kf[4];
      unpack4(kr[i], kf);
#pragma unroll
      for (int g = 0; g < GP; ++g)
        s[i * GP + g] = qf[g][0] * kf[0] + qf[g][1] * kf[1] + qf[g][2] * kf[2] + qf[g][3] * kf[3];
    }
    lane_reduce<NS, 16>(s, lane);
    const int mine = reduced_entry<NS>(lane);
    const float score = first + mine / GP < seq_len ? s[0] * p.scale_log2 : -INFINITY;
    s_scores[warp][mine] = score;
    __syncwarp();
    float sc[NS];
    auto read_chunk = [&]() {
#pragma unroll
      for (int e = 0; e < NS; e += 4) {
        const float4 v4 = *reinterpret_cast<const float4*>(&s_scores[warp][e]);
        sc[e] = v4.x; sc[e + 1] = v4.y; sc[e + 2] = v4.z; sc[e + 3] = v4.w;
      }
    };
    read_chunk();
    float m_mine = 0.f;
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < T; ++i) mx = fmaxf(mx, sc[i * GP + g]);
      const float m_new = fmaxf(m[g], mx);
      const float alpha = exp2f(m[g] - m_new);
      l[g] *= alpha;
#pragma unroll
      for (int d = 0; d < 4; ++d) acc[g][d] *= alpha;
      m[g] = m_new;
      if (mine % GP == g) m_mine = m_new;
    }
    __syncwarp();
    s_scores[warp][mine] = exp2f(score - m_mine);
    __syncwarp();
    read_chunk();
    __syncwarp();
#pragma unroll
    for (int i = 0; i < T; ++i) {
      float vf[4];
      unpack4(vr[i], vf);
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        const float pr = sc[i * GP + g];
        l[g] += pr;
#pragma unroll
        for (int d = 0; d < 4; ++d) acc[g][d] = fmaf(pr, vf[d], acc[g][d]);
      }
    }
#pragma unroll
    for (int i = 0; i < T; ++i) {
      kr[i] = kn[i];
      vr[i] = vn[i];
      kn[i] = k2[i];
      vn[i] = v2[i];
    }
  }
  go_point(2);
  // The warps' partials (shared memory), then this CTA's (read by the cluster).
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    if (lane == 0) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
    s_acc[warp][g][lane] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
  }
  consumers_sync();
  for (int t = tid; t < GP * 32; t += kConsumers) {
    const int g = t / 32, dl = t % 32;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.f;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = s_m[w][g] == -INFINITY ? 0.f : exp2f(s_m[w][g] - mx);
      sum += wt * s_l[w][g];
      const float4 x = s_acc[w][g][dl];
      a.x += wt * x.x; a.y += wt * x.y; a.z += wt * x.z; a.w += wt * x.w;
    }
    if (dl == 0) {
      c_m[g] = mx;
      c_l[g] = sum;
    }
    c_acc[g][dl] = a;
  }
  cluster_arrive();  // barrier 1: this CTA's partial is published
  cluster_wait();
  if (p.stamps && tid == 0) p.stamps[blockIdx.x * 4 + 3] = now_ns();
  // The whole attention output, every head, as this CTA's GEMV operand: head hq's dims
  // 4 dl .. 4 dl + 3 from the partials of the S CTAs of its KV head.
  // Two items a thread at a time, every partial of both loaded before any is used: one round
  // trip through the cluster's shared memory per pair (dependent loads took ~3 us here).
  for (int t0 = tid; t0 < p.num_heads * 32; t0 += 2 * kConsumers) {
    float mr[2][kMaxSplits], lr[2][kMaxSplits];
    float4 ar[2][kMaxSplits];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int t = t0 + u * kConsumers;
      const int hq = t / 32, dl = t % 32;
      const int kvh = hq / p.group, g = hq % p.group;
#pragma unroll
      for (int r = 0; r < kMaxSplits; ++r) {
        if (r < p.splits && t < p.num_heads * 32) {
          const int peer = kvh * p.splits + r;
          mr[u][r] = *cluster.map_shared_rank(&c_m[g], peer);
          lr[u][r] = *cluster.map_shared_rank(&c_l[g], peer);
          ar[u][r] = *cluster.map_shared_rank(&c_acc[g][dl], peer);
        } else {
          mr[u][r] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int t = t0 + u * kConsumers;
      if (t >= p.num_heads * 32) continue;
      float mx = -INFINITY;
#pragma unroll
      for (int r = 0; r < kMaxSplits; ++r) mx = fmaxf(mx, mr[u][r]);
      float sum = 0.f;
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int r = 0; r < kMaxSplits; ++r) {
        if (mr[u][r] == -INFINITY) continue;
        const float wt = exp2f(mr[u][r] - mx);
        sum += wt * lr[u][r];
        a.x += wt * ar[u][r].x; a.y += wt * ar[u][r].y; a.z += wt * ar[u][r].z; a.w += wt * ar[u][r].w;
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const float o[4] = {a.x * inv, a.y * inv, a.z * inv, a.w * inv};
      *reinterpret_cast<uint2*>(xs + (t / 32) * kDim + (t % 32) * 4) = pack4(o);
    }
  }
  cluster_arrive();  // barrier 2: the peers' partials are read (waited for before exiting)
  consumers_sync();
  if (tid == 0) {
    *operand_ready = 1;
    if (p.stamps) p.stamps[blockIdx.x * 4 + 1] = now_ns();
  }

  // ---- the O projection: this CTA's slab of rows against the operand ----
  const int kv = p.K / 8;
  const uint4* xv = reinterpret_cast<const uint4*>(xs);
  const uint32_t tag = static_cast<uint32_t>((site_calls + 1) & 0xFFFFu);
  for (int st = 0; st < my_chunks; ++st) {
    const int sl = st % S;
    mbar_wait(&full[sl], (st / S) & 1);
    const int chunk = first_chunk + st;
    const int rows_in = min(R, p.N - chunk * R);
    const __nv_bfloat16* ws = ring + sl * stage_elems;
    const int first = st * R;
    for (int jr = ((warp - first % kWarps) + kWarps) % kWarps; jr < rows_in; jr += kWarps) {
      const uint4* wrow = reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(jr) * p.K);
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      int v = lane;
      for (; v + 96 < kv; v += 128) {
        fma8(wrow[v], xv[v], a0);
        fma8(wrow[v + 32], xv[v + 32], a1);
        fma8(wrow[v + 64], xv[v + 64], a2);
        fma8(wrow[v + 96], xv[v + 96], a3);
      }
      for (; v < kv; v += 32) fma8(wrow[v], xv[v], a0);
      const float sum = warp_sum((a0 + a1) + (a2 + a3));
      if (lane == 0) {
        const int row = chunk * R + jr;
        if (p.num_push > 0) {
          const int64_t at = static_cast<int64_t>(p.rank) * p.N + row;
          const uint32_t word = tag << 16 | __bfloat16_as_ushort(__float2bfloat16(sum));
          for (int r = 0; r < p.num_push; ++r) st_word(static_cast<uint32_t*>(p.push[r]) + at, word);
        } else {
          p.out[row] = __float2bfloat16(sum);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[sl]);
  }
  if (p.stamps || p.num_push > 0) consumers_sync();
  if (p.stamps && tid == 0) p.stamps[blockIdx.x * 4 + 2] = now_ns();
  if (p.num_push > 0 && tid == 0) {
    const unsigned long long rows_done = static_cast<unsigned long long>(
        max(0, min(my_chunks * R, p.N - first_chunk * R)));
    if (rows_done > 0) {
      for (int r = 0; r < p.num_push; ++r) {
        unsigned long long* counts = reinterpret_cast<unsigned long long*>(
            static_cast<char*>(p.push[r]) + static_cast<int64_t>(p.world) * p.N * 4);
        red_add_sys(counts + p.rank, rows_done);
      }
    }
  }
  cluster_wait();  // barrier 2: no CTA leaves while a peer may still read its partial
}

}  // namespace

// Max active clusters of `cluster` CTAs of this kernel with `smem` dynamic shared bytes.
static int max_clusters(void (*kernel)(Params), int cluster, int64_t smem) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(cluster * 64));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &cfg));
  return n;
}

// out[N] (or the site's buffers) = W [N, K] @ attention(q, cache) for one decode token.
// Returns the number of clusters launched.
int64_t decode_o(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor seq_lens,
                 torch::Tensor block_tables, c10::optional<torch::Tensor> new_k, c10::optional<torch::Tensor> new_v,
                 c10::optional<torch::Tensor> slot_mapping, c10::optional<torch::Tensor> positions,
                 c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin, double scale_log2,
                 torch::Tensor w, torch::Tensor out, std::vector<int64_t> push,
                 c10::optional<torch::Tensor> site_epoch, int64_t rank, int64_t world, int64_t splits,
                 int64_t num_clusters, int64_t rows_per_stage, int64_t num_slots, int64_t ahead, int64_t go, bool pdl,
                 c10::optional<torch::Tensor> stamps) {
  const int num_heads = q.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(q.size(2) == kDim && k_cache.size(3) == kDim, "cuda_decode_o: head_dim must be ", kDim);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= 8, "cuda_decode_o: group of at most 8");
  const int cluster = num_kv_heads * static_cast<int>(splits);
  TORCH_CHECK(splits >= 1 && splits <= kMaxSplits && cluster <= kMaxCluster, "cuda_decode_o: bad cluster");
  const int group = num_heads / num_kv_heads;
  const int gp = group == 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8;
  const int page = k_cache.size(1);
  TORCH_CHECK(page % (gp >= 4 ? 32 / gp : 8) == 0, "cuda_decode_o: page size not a multiple of the chunk");
  const int N = w.size(0), K = w.size(1);
  TORCH_CHECK(K == num_heads * kDim, "cuda_decode_o: the O weight's K must be heads x 128");
  TORCH_CHECK(num_slots >= 1 && num_slots <= kMaxSlots, "cuda_decode_o: num_slots out of range");
  TORCH_CHECK(world <= kMaxWorld && static_cast<int64_t>(push.size()) <= world, "cuda_decode_o: bad site");
  TORCH_CHECK(push.empty() || site_epoch, "cuda_decode_o: push needs the site's epoch");
  const c10::cuda::CUDAGuard guard(q.device());
  Params p;
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.k_cache = reinterpret_cast<__nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = reinterpret_cast<__nv_bfloat16*>(v_cache.data_ptr());
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.block_tables = block_tables.data_ptr<int64_t>();
  p.write_kv = new_k.has_value();
  p.rope = positions.has_value();
  p.new_k = p.write_kv ? reinterpret_cast<const __nv_bfloat16*>(new_k->data_ptr()) : nullptr;
  p.new_v = p.write_kv ? reinterpret_cast<const __nv_bfloat16*>(new_v->data_ptr()) : nullptr;
  p.slot_mapping = p.write_kv ? slot_mapping->data_ptr<int64_t>() : nullptr;
  p.positions = p.rope ? positions->data_ptr<int64_t>() : nullptr;
  p.cos = p.rope ? cos->data_ptr<float>() : nullptr;
  p.sin = p.rope ? sin->data_ptr<float>() : nullptr;
  p.stride_qh = q.stride(1);
  p.stride_cb = k_cache.stride(0);
  p.stride_ct = k_cache.stride(1);
  p.stride_ch = k_cache.stride(2);
  p.stride_nkh = p.write_kv ? new_k->stride(1) : 0;
  p.stride_nvh = p.write_kv ? new_v->stride(1) : 0;
  p.stride_cos = p.rope ? cos->stride(0) : 0;
  p.scale_log2 = static_cast<float>(scale_log2);
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.page = page;
  p.group = group;
  p.num_heads = num_heads;
  p.splits = static_cast<int>(splits);
  p.w = reinterpret_cast<const __nv_bfloat16*>(w.data_ptr());
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.N = N;
  p.K = K;
  p.rows_per_stage = static_cast<int>(rows_per_stage);
  p.num_slots = static_cast<int>(num_slots);
  p.ring_offset = (kOperandOffset + K * 2 + 127) / 128 * 128;
  p.ahead = static_cast<int>(ahead);
  p.go = static_cast<int>(go);
  for (int r = 0; r < kMaxWorld; ++r)
    p.push[r] = r < static_cast<int>(push.size()) ? reinterpret_cast<void*>(push[r]) : nullptr;
  p.num_push = static_cast<int>(push.size());
  p.site_epoch = site_epoch ? reinterpret_cast<unsigned long long*>(site_epoch->data_ptr()) : nullptr;
  p.rank = static_cast<int>(rank);
  p.world = static_cast<int>(world);
  p.stamps = stamps ? reinterpret_cast<unsigned long long*>(stamps->data_ptr()) : nullptr;
  const int64_t smem = p.ring_offset + num_slots * rows_per_stage * static_cast<int64_t>(K) * 2;
  auto launch = [&](void (*kernel)(Params)) -> int64_t {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    int clusters = static_cast<int>(num_clusters);
    if (clusters <= 0) clusters = max_clusters(kernel, cluster, smem);
    TORCH_CHECK(clusters >= 1, "cuda_decode_o: no cluster of ", cluster, " CTAs fits (", smem, " bytes each)");
    TORCH_CHECK(!p.stamps || stamps->numel() >= clusters * cluster * 4, "cuda_decode_o: stamps too small");
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(clusters * cluster));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = at::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
    cfg.attrs = attr;
    cfg.numAttrs = 2;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
    return clusters;
  };
  if (gp == 1) return launch(decode_o_kernel<1>);
  if (gp == 2) return launch(decode_o_kernel<2>);
  if (gp == 4) return launch(decode_o_kernel<4>);
  return launch(decode_o_kernel<8>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_o", &decode_o, "one decode token's attention and O projection (cuda_decode_o.cu)");
}
