// Decode attention for small batches as one kernel (attention/cuda_decode.py builds and calls it).
//
// One query token per request attends over its paged KV (bf16, head_dim 128). The Triton path
// (triton_kernels._decode_attention_kernel + _reduce_splits_kernel) splits each KV head's
// context over programs and combines their partials in a second kernel; at batch 1 that is
// latency, not bandwidth: ~10 us per layer on an H200 from the QKV projection's end to the O
// projection's start, most of it dependent round trips (the request's length, its query, the
// rotary rows, the slot, the block table, the tile, the partials) and the second kernel's
// boundary. Here:
//  - A thread-block cluster of C CTAs serves one (request, KV head); its C * kWarps warps take
//    the context's chunks of kChunk tokens in turn (chunk c to warp c mod (C * kWarps)), each
//    warp holding the chunk's keys and values in registers (lane l: dims 4l..4l+3).
//  - Everything that depends on nothing is loaded in the first round trip (the length, the
//    query, this step's key/value, the slot, the position, each warp's first 32 block ids),
//    then the rotary rows and the first chunk; each warp loads its next chunk before it
//    computes the current one.
//  - The warps' partials (max, sum, unnormalised output) are combined in shared memory, the
//    CTAs' through distributed shared memory (cluster barrier): no second kernel, no atomics.
//  - With `write_kv` this step's key (rotated with `rope`, NeoX, full head dim) and value go
//    into the cache from the warp whose chunk holds them, which also uses them from registers.
//
// Decodes come first in a batch, one token each: request b's query is token b.
// Scores are in base 2 (scale * log2(e)), as in the Triton kernels.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace cg = cooperative_groups;

namespace {

constexpr int kDim = 128;  // head dim: 32 lanes x 4
constexpr int kMaxCluster = 16;  // above 8: a non-portable cluster size (H100 / H200 have 16)
constexpr unsigned kFull = 0xffffffffu;

// Tokens per chunk for a (padded) group of GP query heads: a chunk's GP * kChunk <= 32 scores
// leave each lane at most one (token, head) score after the lane reduction, and its keys and
// values (twice: the next chunk is in flight) stay in registers.
template <int GP>
constexpr int kChunk = GP >= 4 ? 32 / GP : 8;

struct Params {
  const __nv_bfloat16* q;
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
  __nv_bfloat16* out;
  const int64_t* seq_lens;
  const int64_t* block_tables;
  const __nv_bfloat16* new_k;
  const __nv_bfloat16* new_v;
  const int64_t* slot_mapping;
  const int64_t* positions;
  const float* cos;
  const float* sin;
  int64_t stride_qt, stride_qh, stride_ot, stride_oh;
  int64_t stride_cb, stride_ct, stride_ch, stride_bt;
  int64_t stride_nkt, stride_nkh, stride_nvt, stride_nvh, stride_cos;
  float scale_log2;
  int max_blocks, page, group;
  int write_kv, rope;
  int pdl_trigger;  // let the next kernel launch as this one starts
};

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

// NeoX rotary of this lane's 4 dims (lane l: 4l..4l+3; the partner dims d +- 64 are lane l ^ 16's),
// the same fp32 expressions as the Triton kernels, rounded to bf16.
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

// Sums N per-lane partials over the warp's 32 lanes, halving the values each step (lane bit O
// picks the half it keeps): N - 1 shuffles instead of 5 N. Afterwards entry `reduced_entry`
// (lanes that share it hold the same sum) is in v[0].
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

// GP: the group padded to a power of two; kWarps: warps per CTA (4 or 8).
template <int GP, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(const Params p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int T = kChunk<GP>;
  constexpr int N = T * GP;  // scores of one chunk, entry i * GP + g
  __shared__ __align__(16) float s_scores[kWarps][N];
  __shared__ float s_m[kWarps][GP], s_l[kWarps][GP];
  __shared__ float4 s_acc[kWarps][GP][32];
  __shared__ float c_m[GP], c_l[GP];  // this CTA's partial, read by the cluster
  __shared__ float4 c_acc[GP][32];

  // The O projection after this kernel may launch now (it waits for this grid's completion
  // before reading the output); launched with PDL, this kernel waits for the QKV projection here.
  if (p.pdl_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");

  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int kvh = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gw = rank * kWarps + warp, nw = C * kWarps;
  const int64_t token = b;

  // First round trip: what depends on nothing.
  const int seq_len = static_cast<int>(p.seq_lens[b]);
  const int64_t* bt_row = p.block_tables + b * p.stride_bt;
  // Token counts fit 32 bits (the 64-bit divisions cost on the chunk loop's critical path).
  auto block_of = [&](int j) -> int64_t {  // lane's block id for this warp's chunk j (or -1)
    const int idx = (gw + j * nw) * T / p.page;
    return idx < p.max_blocks ? bt_row[idx] : -1;
  };
  int64_t blocks = block_of(lane);  // lane j: the warp's chunk j (refreshed every 32 chunks)
  uint2 qraw[GP];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    qraw[g] = g < p.group ? ld2(p.q + token * p.stride_qt + (kvh * p.group + g) * p.stride_qh + lane * 4)
                          : make_uint2(0u, 0u);
  }
  uint2 new_k = make_uint2(0u, 0u), new_v = make_uint2(0u, 0u);
  int64_t slot = -1, pos = 0;
  if (p.write_kv) {
    new_k = ld2(p.new_k + token * p.stride_nkt + kvh * p.stride_nkh + lane * 4);
    new_v = ld2(p.new_v + token * p.stride_nvt + kvh * p.stride_nvh + lane * 4);
    slot = p.slot_mapping[token];
  }
  if (p.rope) pos = p.positions[token];

  const int num_chunks = (seq_len + T - 1) / T;
  const int newest = p.write_kv ? seq_len - 1 : -1;  // taken from registers, not the cache
  uint2 kr[T], vr[T];
  auto load_chunk = [&](int c, int64_t block, uint2 (&k)[T], uint2 (&v)[T]) {
    const int64_t base = block * p.stride_cb + kvh * p.stride_ch + lane * 4;
    const int first = (c * T) % p.page;
#pragma unroll
    for (int i = 0; i < T; ++i) {
      const int64_t at = base + (first + i) * p.stride_ct;
      k[i] = ld2(p.k_cache + at);
      v[i] = ld2(p.v_cache + at);
    }
  };
  if (gw < num_chunks) load_chunk(gw, __shfl_sync(kFull, blocks, 0), kr, vr);

  // Second round trip (with the first chunk): the rotary rows.
  float qf[GP][4];
  if (p.rope) {
    const float4 c = *reinterpret_cast<const float4*>(p.cos + pos * p.stride_cos + lane * 4);
    const float4 s = *reinterpret_cast<const float4*>(p.sin + pos * p.stride_cos + lane * 4);
#pragma unroll
    for (int g = 0; g < GP; ++g) qraw[g] = rotate(qraw[g], c, s, lane);
    if (p.write_kv) new_k = rotate(new_k, c, s, lane);
  }
#pragma unroll
  for (int g = 0; g < GP; ++g) unpack4(qraw[g], qf[g]);
  if (newest >= 0 && slot >= 0 && (newest / T) % nw == gw) {
    const int64_t at = (slot / p.page) * p.stride_cb + (slot % p.page) * p.stride_ct + kvh * p.stride_ch + lane * 4;
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
    uint2 kn[T], vn[T];
    const int next = c + nw;
    if (next < num_chunks) {
      if ((j + 1) % 32 == 0) blocks = block_of(j + 1 + lane);
      load_chunk(next, __shfl_sync(kFull, blocks, (j + 1) % 32), kn, vn);
    }
    const int first = c * T;
#pragma unroll
    for (int i = 0; i < T; ++i) {
      if (first + i == newest) {
        kr[i] = new_k;
        vr[i] = new_v;
      }
    }
    // Scores: this lane's 4 dims, then summed over the lanes; each lane keeps one entry.
    float s[N];
#pragma unroll
    for (int i = 0; i < T; ++i) {
      float kf[4];
      unpack4(kr[i], kf);
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        s[i * GP + g] = qf[g][0] * kf[0] + qf[g][1] * kf[1] + qf[g][2] * kf[2] + qf[g][3] * kf[3];
      }
    }
    lane_reduce<N, 16>(s, lane);
    // This lane's entry (token i, head g), scaled to base 2 and masked past the sequence's end.
    const int mine = reduced_entry<N>(lane);
    const float score = first + mine / GP < seq_len ? s[0] * p.scale_log2 : -INFINITY;
    s_scores[warp][mine] = score;
    __syncwarp();
    float sc[N];
    auto read_chunk = [&]() {
#pragma unroll
      for (int e = 0; e < N; e += 4) {
        const float4 v4 = *reinterpret_cast<const float4*>(&s_scores[warp][e]);
        sc[e] = v4.x; sc[e + 1] = v4.y; sc[e + 2] = v4.z; sc[e + 3] = v4.w;
      }
    };
    read_chunk();
    // Online softmax over the chunk (at least its first token is valid): the running max and
    // rescale, every lane alike; then each lane exponentiates its own entry only (the special
    // function unit is shared by the SM's warps) and the warp reads the probabilities back.
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
    }
  }

  // Combine the warps (shared memory), then the cluster's CTAs (distributed shared memory).
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    if (lane == 0) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
    s_acc[warp][g][lane] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
  }
  __syncthreads();
  for (int t = threadIdx.x; t < GP * 32; t += kThreads) {
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
  cluster.sync();
  for (int g = rank + warp * C; g < GP; g += C * kWarps) {
    float mr[kMaxCluster];
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {
      mr[r] = r < C ? *cluster.map_shared_rank(&c_m[g], r) : -INFINITY;
      mx = fmaxf(mx, mr[r]);
    }
    float sum = 0.f;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {
      if (r >= C || mr[r] == -INFINITY) continue;
      const float wt = exp2f(mr[r] - mx);
      sum += wt * *cluster.map_shared_rank(&c_l[g], r);
      const float4 x = *cluster.map_shared_rank(&c_acc[g][lane], r);
      a.x += wt * x.x; a.y += wt * x.y; a.z += wt * x.z; a.w += wt * x.w;
    }
    // No key at all (a padding request of length 0): zeros, as the Triton kernels write.
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const float o[4] = {a.x * inv, a.y * inv, a.z * inv, a.w * inv};
    if (g < p.group)
      *reinterpret_cast<uint2*>(p.out + token * p.stride_ot + (kvh * p.group + g) * p.stride_oh + lane * 4) = pack4(o);
  }
  cluster.sync();  // a CTA's shared memory must outlive the cluster's reads of it
}

}  // namespace

// out[token b, heads, :] for decodes b < num_decodes (grid: cluster x kv heads x decodes).
void decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor out,
            torch::Tensor seq_lens, torch::Tensor block_tables, c10::optional<torch::Tensor> new_k,
            c10::optional<torch::Tensor> new_v, c10::optional<torch::Tensor> slot_mapping,
            c10::optional<torch::Tensor> positions, c10::optional<torch::Tensor> cos,
            c10::optional<torch::Tensor> sin, int64_t num_decodes, double scale_log2, int64_t cluster, int64_t warps,
            bool pdl_trigger, bool pdl) {
  const int num_heads = q.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(q.size(2) == kDim && k_cache.size(3) == kDim, "cuda_decode: head_dim must be ", kDim);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= 8, "cuda_decode: group of at most 8");
  TORCH_CHECK(cluster >= 1 && cluster <= kMaxCluster, "cuda_decode: cluster size out of range");
  TORCH_CHECK(warps == 4 || warps == 8, "cuda_decode: 4 or 8 warps per CTA");
  const int group = num_heads / num_kv_heads;
  const int gp = group == 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8;
  const int page = k_cache.size(1);
  TORCH_CHECK(page % (gp >= 4 ? 32 / gp : 8) == 0, "cuda_decode: page size ", page, " not a multiple of the chunk");
  const c10::cuda::CUDAGuard guard(q.device());
  Params p;
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.k_cache = reinterpret_cast<__nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = reinterpret_cast<__nv_bfloat16*>(v_cache.data_ptr());
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
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
  p.stride_qt = q.stride(0);
  p.stride_qh = q.stride(1);
  p.stride_ot = out.stride(0);
  p.stride_oh = out.stride(1);
  p.stride_cb = k_cache.stride(0);
  p.stride_ct = k_cache.stride(1);
  p.stride_ch = k_cache.stride(2);
  p.stride_bt = block_tables.stride(0);
  p.stride_nkt = p.write_kv ? new_k->stride(0) : 0;
  p.stride_nkh = p.write_kv ? new_k->stride(1) : 0;
  p.stride_nvt = p.write_kv ? new_v->stride(0) : 0;
  p.stride_nvh = p.write_kv ? new_v->stride(1) : 0;
  p.stride_cos = p.rope ? cos->stride(0) : 0;
  p.scale_log2 = static_cast<float>(scale_log2);
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.page = page;
  p.group = group;
  p.pdl_trigger = pdl_trigger ? 1 : 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(cluster), static_cast<unsigned>(num_kv_heads),
                     static_cast<unsigned>(num_decodes));
  cfg.blockDim = dim3(static_cast<unsigned>(warps * 32));
  cfg.dynamicSmemBytes = 0;
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
  auto go = [&](auto kernel) {
    if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  };
  auto by_warps = [&](auto four, auto eight) { warps == 4 ? go(four) : go(eight); };
  if (gp == 1) by_warps(decode_kernel<1, 4>, decode_kernel<1, 8>);
  else if (gp == 2) by_warps(decode_kernel<2, 4>, decode_kernel<2, 8>);
  else if (gp == 4) by_warps(decode_kernel<4, 4>, decode_kernel<4, 8>);
  else by_warps(decode_kernel<8, 4>, decode_kernel<8, 8>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode", &decode, "small-batch decode attention (cuda_decode.cu)"); }
