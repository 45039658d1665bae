// Every decoder layer of a one-token Llama decode step in one persistent kernel (sm_90+, bf16).
// models/llama_megakernel.py builds and calls it; see its docstring for the why.
//
// One CTA per SM, for the whole step. Warp 8 of each CTA (the producer) streams the rows of
// every weight matrix the CTA owns, layer after layer (QKV, O, gate_up, down), into a ring of
// 32 KB shared-memory stages with bulk copies (cp.async.bulk). The weights need nothing the step
// computes, so the stream never waits for the activations: while the other warps wait for a
// phase's input, the ring fills with the next phase's rows. The eight consumer warps run the
// phases in order:
//
//   QKV      operand = RMSNorm(residual + sum of the ranks' down partials), as cuda_gemv.cu's
//            MODE 2 (s = round(h + r), x = round(s * w), y = rsqrt(mean(s^2) + eps) * (W x))
//   attn     CTA (kv head, split): its cached keys/values loaded while QKV still runs; then RoPE
//            (NeoX) on q and the new k, the new k/v written into the paged cache, a flash-decoding
//            partial over its keys; split 0 of each kv head combines the partials
//   O        operand = attention output; rows -> this rank's partial, pushed to every rank
//   gate_up  operand = RMSNorm(residual + sum of the ranks' O partials)
//   down     operand = round(round(silu(g)) * u); rows -> partial, pushed to every rank
//
// A matrix's stages (whole rows, ~32 KB) are mostly split statically (CTA c streams a contiguous
// slab); the rest go out through a ticket counter, so the CTAs that stream faster take more and
// every CTA finishes a phase at about the same time (the next phase waits for the slowest).
// A launch draws exactly (dynamic stages + CTAs) tickets per matrix: every CTA stops at its first
// ticket past the stages, so ticket t means stage t mod (that sum) and counters never need reset.
//
// The residual stream lives in every CTA's shared memory (each CTA computes the same bits).
// The latency-bound hand-offs (QKV rows to attention, partials to their combiner, attention
// output to O) go through tagged 8-byte words: the value and the launch's tag stored at once, so
// a reader polls exactly the words it needs and a word with the tag holds its value (no fence, no
// flag, no counter round trip: a memory round trip under the full weight stream costs ~2 us).
// Between the other phases a CTA waits on a counter in global memory: every CTA adds 1 when its rows of
// a phase are written (the row-parallel phases add 1 on every rank, over NVLink, after pushing
// their rows into every rank's buffer: the all-reduce needs no kernel of its own). Counters only
// grow: the launch with epoch e waits for (e + 1) times a launch's arrivals. The epoch is read
// from device memory at the start and advanced by the last CTA to finish, so the kernel replays
// from a CUDA graph. Every rank sums the partials in rank order in fp32: the same bits everywhere.
//
// The grid must be co-resident (one CTA per SM, ~200 KB of shared memory each): nothing else may
// run on the GPU beside it, as in the engine's decode step.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#ifndef MEGAKERNEL_NO_TORCH
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using bf16 = __nv_bfloat16;
using u64 = unsigned long long;
constexpr int kWarps = 8;                    // consumer warps
constexpr int kThreads = (kWarps + 1) * 32;  // + the producer warp
constexpr int kConsumers = kWarps * 32;
constexpr int kStageBytes = 32 * 1024;
constexpr int kStageElems = kStageBytes / 2;
constexpr int kMaxSlots = 8;
constexpr int kHeadDim = 128;
constexpr int kMaxGroup = 8;      // query heads per kv head
constexpr int kMaxWorld = 8;
constexpr int kMinSplitTokens = 32;
constexpr int kPhases = 5;
enum { kO = 2, kGateUp = 3, kDown = 4 };  // counters (0 and 1 are unused)
// Per CTA and layer (global timer, ns): 0 start, 1 QKV operand in, 2 QKV rows done, 3 attention
// start, 4 attention done, 5 O operand in, 6 O done, 7 gate_up operand in, 8 gate_up done,
// 9 down operand in, 10 down done.
constexpr int kStamps = 16;
// Shared layout: [full barriers][empty barriers][stage of each slot][misc floats][misc u64] |
// residual | operand or attention scratch | ring
constexpr int kEmptyOffset = 64;
constexpr int kSlotChunkOffset = 128;
constexpr int kMiscOffset = 256;
constexpr int kMiscU64Offset = 384;
constexpr int kResidualOffset = 512;

struct Layer {
  const bf16* w_qkv;      // [q + 2 kv, hidden]
  const bf16* w_o;        // [hidden, q]
  const bf16* w_gate_up;  // [2 inter, hidden]
  const bf16* w_down;     // [hidden, inter]
  const bf16* ln1;        // [hidden]
  const bf16* ln2;        // [hidden]
  bf16* k_cache;          // [blocks, block_size, kv heads, 128]
  bf16* v_cache;
};

struct Params {
  const Layer* layers;
  int num_layers, hidden, num_heads, num_kv_heads, inter;  // this rank's shares
  float eps, scale_log2;
  const bf16* hidden_in;
  bf16* hidden_out;
  bf16* residual_out;
  const int64_t* positions;
  const int64_t* slot_mapping;
  const int64_t* seq_lens;
  const int64_t* block_table;  // row 0
  int block_size;
  int64_t stride_block, stride_token, stride_head;
  const float* cos;
  const float* sin;
  int64_t rope_stride;
  // Tagged words (value bits | launch tag << 32): a reader polls the words it needs, no flags.
  u64* qkv_words;   // [layers][q + 2 kv]
  u64* part_words;  // [layers][heads][max_splits][128 + 2]: attention partials, then max and sum
  u64* attn_words;  // [layers][q]
  bf16* gate_up;    // [layers][2 inter]
  bf16* reduce[kMaxWorld];   // each rank's [layers][2][world][hidden], mapped here
  u64* counters[kMaxWorld];  // each rank's [layers][kPhases], mapped here
  u64* epoch;                // [2]: epoch, CTAs finished
  u64* tickets;               // [layers * 4]: each matrix's ticket counter
  int rank, world, max_splits, num_slots;
  int static_permille;  // share of each matrix's stages split statically
  int ahead;            // bulk copies in flight per CTA at most (0: as many as the ring holds)
  int off_union, off_ring;
  u64* stamps;  // [grid][layers][kStamps] or null
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// A wait that outlasts this is a bug or a dead peer: trap (a launch error) rather than hang the GPU.
constexpr unsigned long long kWaitLimitNs = 10ull * 1000 * 1000 * 1000;
__device__ __forceinline__ void check_deadline(unsigned long long& start, unsigned& spins, const char* what) {
  if ((++spins & 1023) == 0) {
    const unsigned long long t = now_ns();
    if (start == 0) {
      start = t;
    } else if (t - start > kWaitLimitNs) {
      printf("llama_megakernel: block %d thread %d waited 10 s for %s; trapping\n", blockIdx.x, threadIdx.x, what);
      __trap();
    }
  }
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  unsigned long long start = 0;
  unsigned spins = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    if (!done) check_deadline(start, spins, "a ring stage");
  } while (!done);
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory"); }
__device__ __forceinline__ u64 ld_acquire(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release(u64* p, u64 v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 ld_relaxed(const u64* p) {
  u64 v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void put_word(u64* p, uint32_t tag, float value) {
  const u64 w = (static_cast<u64>(tag) << 32) | __float_as_uint(value);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
__device__ __forceinline__ float word_value(u64 w) { return __uint_as_float(static_cast<uint32_t>(w)); }

// The value of the word at p once it carries `tag`, given a first load w of it.
__device__ __forceinline__ float await_word(const u64* p, u64 w, uint32_t tag) {
  unsigned long long start = 0;
  unsigned spins = 0;
  while (static_cast<uint32_t>(w >> 32) != tag) {
    __nanosleep(32);
    check_deadline(start, spins, "a tagged word");
    w = ld_relaxed(p);
  }
  return word_value(w);
}

// sink(i, value) for words i = first, first + step, ... < n of `words`, each once it carries `tag`;
// up to kPoll loads in flight per thread.
constexpr int kPoll = 8;
template <class Sink>
__device__ __forceinline__ void gather_words(const u64* words, int first, int n, int step, uint32_t tag, Sink sink) {
  for (int base = first; base < n; base += kPoll * step) {
    u64 w[kPoll];
#pragma unroll
    for (int j = 0; j < kPoll; ++j) {
      const int i = base + j * step;
      if (i < n) w[j] = ld_relaxed(words + i);
    }
#pragma unroll
    for (int j = 0; j < kPoll; ++j) {
      const int i = base + j * step;
      if (i >= n) break;
      sink(i, await_word(words + i, w[j], tag));
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float bf(const bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float round_bf(float v) { return bf(__float2bfloat16(v)); }

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

// One weight matrix of the stream and how its rows are cut into stages.
struct Gemv {
  const bf16* w;
  int n, k, rows;  // rows per stage
};

__device__ __forceinline__ Gemv gemv_of(const Params& p, int g) {
  const Layer& L = p.layers[g >> 2];
  const int q = p.num_heads * kHeadDim, kv = p.num_kv_heads * kHeadDim;
  Gemv G;
  switch (g & 3) {
    case 0: G = {L.w_qkv, q + 2 * kv, p.hidden, 0}; break;
    case 1: G = {L.w_o, p.hidden, q, 0}; break;
    case 2: G = {L.w_gate_up, 2 * p.inter, p.hidden, 0}; break;
    default: G = {L.w_down, p.hidden, p.inter, 0}; break;
  }
  G.rows = kStageBytes / (G.k * 2);
  return G;
}

// How a matrix of `chunks` stages is shared: `per_cta` static stages per CTA (CTA c: stages
// c * per_cta ..), then `dynamic` stages through tickets.
struct Split {
  int per_cta, static_total, dynamic, period;
};
__device__ __forceinline__ Split split_of(const Params& p, int chunks) {
  Split s;
  s.per_cta = static_cast<int>(static_cast<long long>(chunks) * p.static_permille / 1000 / gridDim.x);
  s.static_total = s.per_cta * gridDim.x;
  s.dynamic = chunks - s.static_total;
  s.period = s.dynamic + gridDim.x;
  return s;
}

__device__ void produce(const Params& p, uint64_t* full, uint64_t* empty, int* slot_chunk, bf16* ring) {
  const int S = p.num_slots;
  const int ahead = p.ahead < S ? p.ahead : 0;
  int st = 0;
  // Stage st of the stream: `chunk` of matrix M, or -1 for the end of this CTA's share of M.
  auto issue = [&](const Gemv& M, int chunk) {
    const int slot = st % S;
    if (st >= S) mbar_wait(&empty[slot], ((st / S) - 1) & 1);
    // Few copies in flight: an SM's loads queue behind its outstanding bulk copies, and the
    // consumers' operand loads are on the step's critical path. Landed stages wait in the ring.
    if (ahead > 0 && st >= ahead) {
      const int back = st - ahead;
      mbar_wait(&full[back % S], (back / S) & 1);
    }
    slot_chunk[slot] = chunk;
    if (chunk < 0) {
      mbar_arrive(&full[slot]);
    } else {
      const uint32_t bytes = static_cast<uint32_t>(min(M.rows, M.n - chunk * M.rows)) * M.k * 2;
      mbar_expect_tx(&full[slot], bytes);
      bulk_load(ring + slot * kStageElems, M.w + static_cast<int64_t>(chunk) * M.rows * M.k, bytes, &full[slot]);
    }
    ++st;
  };
  for (int g = 0; g < 4 * p.num_layers; ++g) {
    const Gemv M = gemv_of(p, g);
    const Split sp = split_of(p, (M.n + M.rows - 1) / M.rows);
    u64* counter = p.tickets + g;
    u64 ticket = 0;
    if (sp.per_cta == 0) ticket = atomicAdd(counter, 1ull);
    for (int i = 0; i < sp.per_cta; ++i) {
      // the first ticket is drawn one stage early: its round trip overlaps that stage's wait
      if (i == sp.per_cta - 1) ticket = atomicAdd(counter, 1ull);
      issue(M, blockIdx.x * sp.per_cta + i);
    }
    for (;;) {
      const int local = static_cast<int>(ticket % static_cast<u64>(sp.period));
      if (local >= sp.dynamic) break;
      const u64 next = atomicAdd(counter, 1ull);  // in flight while this stage's slot is waited for
      issue(M, sp.static_total + local);
      ticket = next;
    }
    issue(M, -1);
  }
}

// Reduce the stages of matrix g the producer hands this CTA (until its end marker) against the
// operand xs (shared); emit(row, dot) on lane 0.
template <class Emit>
__device__ __forceinline__ void consume(const Params& p, int g, int& st, uint64_t* full, uint64_t* empty,
                                        const int* slot_chunk, const bf16* ring, const bf16* xs, Emit emit) {
  const Gemv G = gemv_of(p, g);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, S = p.num_slots;
  const int kv = G.k / 8;
  const uint4* xv = reinterpret_cast<const uint4*>(xs);
  for (;;) {
    const int slot = st % S;
    mbar_wait(&full[slot], (st / S) & 1);
    const int chunk = slot_chunk[slot];
    if (chunk >= 0) {
      const int rows_in = min(G.rows, G.n - chunk * G.rows);
      const bf16* ws = ring + slot * kStageElems;
      // rows rotate over the warps from stage to stage (a stage may hold fewer rows than warps)
      for (int j = ((warp - (st * G.rows) % kWarps) + kWarps) % kWarps; j < rows_in; j += kWarps) {
        const uint4* wrow = reinterpret_cast<const uint4*>(ws + j * G.k);
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
        if (lane == 0) emit(chunk * G.rows + j, sum);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
    ++st;
    if (chunk < 0) return;
  }
}

// Thread 0 waits until *counter >= target; then every consumer goes on.
__device__ __forceinline__ void wait_counter(const u64* counter, u64 target) {
  if (threadIdx.x == 0) {
    unsigned long long start = 0;
    unsigned spins = 0;
    while (ld_acquire(counter) < target) check_deadline(start, spins, "a phase counter");
  }
  consumers_sync();
}

// After every consumer's writes of a phase: add 1 to the phase's counter on ranks [r0, r1).
__device__ __forceinline__ void arrive(const Params& p, int index, int r0, int r1) {
  consumers_sync();
  if (threadIdx.x == 0) {
    __threadfence_system();
    for (int r = r0; r < r1; ++r) red_release(p.counters[r] + index, 1);
  }
}

// xs = round(s * w) with s = round(sum of the nsrc rows of src + residual), residual = s;
// returns rsqrt(mean(s^2) + eps). `first`: no residual yet (s = src).
__device__ float operand_add_norm(const Params& p, const bf16* src, int nsrc, bf16* res, const bf16* w, bf16* xs,
                                  bool first, float* misc) {
  const int tid = threadIdx.x, H = p.hidden;
  float ssq = 0.f;
  for (int v = tid; v < H / 8; v += kConsumers) {
    float h[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < nsrc; ++r) {
      const uint4 word = __ldcg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * H) + v);
      const bf16* e = reinterpret_cast<const bf16*>(&word);
#pragma unroll
      for (int j = 0; j < 8; ++j) h[j] += bf(e[j]);
    }
    uint4 r4 = make_uint4(0, 0, 0, 0);
    if (!first) r4 = reinterpret_cast<const uint4*>(res)[v];
    const uint4 w4 = __ldg(reinterpret_cast<const uint4*>(w) + v);
    const bf16* rr = reinterpret_cast<const bf16*>(&r4);
    const bf16* ww = reinterpret_cast<const bf16*>(&w4);
    uint4 s4, o4;
    bf16* s = reinterpret_cast<bf16*>(&s4);
    bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j] = __float2bfloat16(round_bf(h[j]) + bf(rr[j]));
      const float sf = bf(s[j]);
      ssq += sf * sf;
      o[j] = __float2bfloat16(sf * bf(ww[j]));
    }
    reinterpret_cast<uint4*>(res)[v] = s4;
    reinterpret_cast<uint4*>(xs)[v] = o4;
  }
  ssq = warp_sum(ssq);
  const int warp = tid >> 5;
  if ((tid & 31) == 0) misc[warp] = ssq;
  consumers_sync();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += misc[i];
  consumers_sync();  // misc is reused by the next call
  return rsqrtf(total / H + p.eps);
}

// xs = the n tagged words (written by other CTAs this launch), as bf16.
__device__ void operand_from_words(const u64* words, int n, uint32_t tag, bf16* xs) {
  gather_words(words, threadIdx.x, n, kConsumers, tag, [&](int i, float v) { xs[i] = __float2bfloat16(v); });
  consumers_sync();
}

// xs = round(round(silu(gate)) * up), gate_up = [gate | up] (torch's roundings).
__device__ void operand_silu(const bf16* gate_up, int n, bf16* xs) {
  for (int v = threadIdx.x; v < n / 8; v += kConsumers) {
    const uint4 g4 = __ldcg(reinterpret_cast<const uint4*>(gate_up) + v);
    const uint4 u4 = __ldcg(reinterpret_cast<const uint4*>(gate_up + n) + v);
    const bf16* g = reinterpret_cast<const bf16*>(&g4);
    const bf16* u = reinterpret_cast<const bf16*>(&u4);
    uint4 o4;
    bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float gf = bf(g[j]);
      o[j] = __float2bfloat16(round_bf(__fdividef(gf, 1.f + __expf(-gf))) * bf(u[j]));
    }
    reinterpret_cast<uint4*>(xs)[v] = o4;
  }
  consumers_sync();
}

// This rank's share of the reduce buffer site (layer, site), as mapped on rank r.
__device__ __forceinline__ bf16* site(const Params& p, int r, int layer, int which) {
  return p.reduce[r] + static_cast<int64_t>((layer * 2 + which) * p.world) * p.hidden;
}

// A row-parallel matrix's partial for `row`, into this rank's region of every rank's buffer.
__device__ __forceinline__ void store_partial(const Params& p, int layer, int which, int row, float dot) {
  const bf16 v = __float2bfloat16(dot);
  const int64_t offset = static_cast<int64_t>(p.rank) * p.hidden + row;
  for (int r = 0; r < p.world; ++r) site(p, r, layer, which)[offset] = v;
}

// NeoX rotation of element d of a head x (shared) at the row (cos, sin).
__device__ __forceinline__ float rope(const float* x, int d, const float* cos, const float* sin) {
  const int half = kHeadDim / 2;
  const float partner = d < half ? -x[d + half] : x[d - half];
  return x[d] * cos[d] + partner * sin[d];
}

// Attention scratch in shared memory (floats), for `group` query heads per kv head.
struct AttnScratch {
  float *raw, *q, *new_k, *new_v, *warp_m, *warp_l, *warp_acc;
  __device__ AttnScratch(float* base, int group) {
    raw = base;                            // [group + 1][128]: q heads and k as the QKV rows hold them
    q = raw + (group + 1) * kHeadDim;      // [group][128]
    new_k = q + group * kHeadDim;          // [128]
    new_v = new_k + kHeadDim;              // [128]
    warp_m = new_v + kHeadDim;             // [warps][group]
    warp_l = warp_m + kWarps * group;      // [warps][group]
    warp_acc = warp_l + kWarps * group;    // [warps][group][128]
  }
};

constexpr int kBatch = 4;  // cached tokens per warp whose loads are in flight together

// K/V of the cached tokens t0, t0 + 8, ... (< end, not `skip`) into registers, 4 elements per lane.
__device__ __forceinline__ void load_kv(const Params& p, const Layer& L, int h, int64_t t0, int64_t end, int64_t skip,
                                       uint2 (&k2)[kBatch], uint2 (&v2)[kBatch]) {
  const int lane = threadIdx.x & 31;
  int64_t base[kBatch];
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int64_t t = t0 + u * kWarps;
    const int64_t block = t < end ? p.block_table[t / p.block_size] : 0;
    base[u] = block * p.stride_block + (t % p.block_size) * p.stride_token + h * p.stride_head + lane * 4;
  }
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int64_t t = t0 + u * kWarps;
    if (t < end && t != skip) {
      k2[u] = __ldcg(reinterpret_cast<const uint2*>(L.k_cache + base[u]));
      v2[u] = __ldcg(reinterpret_cast<const uint2*>(L.v_cache + base[u]));
    }
  }
}

// The attention phase of `layer` for this CTA's (kv head, split), if it has one. The cached
// keys and values it reads first need nothing from this step: they are loaded before the wait for
// the QKV phase. The newest token's key and value come from the QKV output (and are written into
// the cache for the steps after).
__device__ void attention(const Params& p, int layer, float* scratch, uint32_t tag) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hkv = p.num_kv_heads, group = p.num_heads / hkv;
  const int64_t seq_len = p.seq_lens[0];
  int64_t wanted = (seq_len + kMinSplitTokens - 1) / kMinSplitTokens;
  wanted = wanted < 1 ? 1 : (wanted > p.max_splits ? p.max_splits : wanted);
  const int splits = static_cast<int>(wanted);
  if (static_cast<int>(blockIdx.x) >= hkv * splits) return;
  const int h = blockIdx.x / splits, split = blockIdx.x % splits;
  const int64_t part = ((seq_len > 0 ? seq_len : 0) + splits - 1) / splits;
  const int64_t kv_start = split * part;
  const int64_t kv_end = seq_len < kv_start + part ? seq_len : kv_start + part;
  const int64_t newest = seq_len - 1;
  const int q_size = p.num_heads * kHeadDim, kv_size = hkv * kHeadDim;
  const u64* qkv = p.qkv_words + static_cast<int64_t>(layer) * (q_size + 2 * kv_size);
  const Layer& L = p.layers[layer];
  const AttnScratch sc(scratch, group);

  uint2 k2[kBatch], v2[kBatch];
  load_kv(p, L, h, kv_start + warp, kv_end, newest, k2, v2);
  // This kv head's query rows, key and value, as the QKV phase writes them.
  const int q_words = group * kHeadDim;
  gather_words(qkv + h * q_words, tid, q_words, kConsumers, tag, [&](int i, float v) { sc.raw[i] = v; });
  gather_words(qkv + q_size + h * kHeadDim, tid, kHeadDim, kConsumers, tag,
               [&](int i, float v) { sc.raw[q_words + i] = v; });
  gather_words(qkv + q_size + kv_size + h * kHeadDim, tid, kHeadDim, kConsumers, tag,
               [&](int i, float v) { sc.new_v[i] = v; });
  consumers_sync();
  if (kv_end > kv_start) {
    const int64_t pos = p.positions[0];
    const float* cos = p.cos + pos * p.rope_stride;
    const float* sin = p.sin + pos * p.rope_stride;
    for (int i = tid; i < q_words; i += kConsumers)
      sc.q[i] = rope(sc.raw + (i / kHeadDim) * kHeadDim, i % kHeadDim, cos, sin);
    if (kv_start <= newest && newest < kv_end && tid < kHeadDim) {
      const bf16 k = __float2bfloat16(rope(sc.raw + q_words, tid, cos, sin));
      const bf16 v = __float2bfloat16(sc.new_v[tid]);
      sc.new_k[tid] = bf(k);
      const int64_t slot = p.slot_mapping[0];
      if (slot >= 0) {
        const int64_t dst = (slot / p.block_size) * p.stride_block + (slot % p.block_size) * p.stride_token +
                            h * p.stride_head + tid;
        L.k_cache[dst] = k;
        L.v_cache[dst] = v;
      }
    }
  }
  consumers_sync();  // the rotated query and the newest key/value are in

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][4];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f;
  }
  for (int64_t t0 = kv_start + warp; t0 < kv_end; t0 += kBatch * kWarps) {
    if (t0 != kv_start + warp) load_kv(p, L, h, t0, kv_end, newest, k2, v2);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t t = t0 + u * kWarps;
      if (t >= kv_end) break;
      float kf[4], vf[4];
      if (t == newest) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          kf[i] = sc.new_k[lane * 4 + i];
          vf[i] = sc.new_v[lane * 4 + i];
        }
      } else {
        const bf16* kk = reinterpret_cast<const bf16*>(&k2[u]);
        const bf16* vv = reinterpret_cast<const bf16*>(&v2[u]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          kf[i] = bf(kk[i]);
          vf[i] = bf(vv[i]);
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) break;
        const float* qg = sc.q + g * kHeadDim + lane * 4;
        const float dot = qg[0] * kf[0] + qg[1] * kf[1] + qg[2] * kf[2] + qg[3] * kf[3];
        const float score = warp_sum(dot) * p.scale_log2;
        const float m_new = fmaxf(m[g], score);
        const float correction = exp2f(m[g] - m_new);
        const float prob = exp2f(score - m_new);
        l[g] = l[g] * correction + prob;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[g][i] = acc[g][i] * correction + prob * vf[i];
        m[g] = m_new;
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
    if (lane == 0) {
      sc.warp_m[warp * group + g] = m[g];
      sc.warp_l[warp * group + g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) sc.warp_acc[(warp * group + g) * kHeadDim + lane * 4 + i] = acc[g][i];
  }
  consumers_sync();
  // This CTA's partial (unnormalized, base-2 max and sum) for its heads and split.
  constexpr int stride = kHeadDim + 2;
  u64* parts = p.part_words + static_cast<int64_t>(layer) * p.num_heads * p.max_splits * stride;
  for (int i = tid; i < q_words; i += kConsumers) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sc.warp_m[w * group + g]);
    float sum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(sc.warp_m[w * group + g] - mx);
        sum += sc.warp_l[w * group + g] * f;
        a += sc.warp_acc[(w * group + g) * kHeadDim + d] * f;
      }
    }
    u64* out = parts + (static_cast<int64_t>(h * group + g) * p.max_splits + split) * stride;
    put_word(out + d, tag, a);
    if (d == 0) {
      put_word(out + kHeadDim, tag, mx);
      put_word(out + kHeadDim + 1, tag, sum);
    }
  }
  if (split != 0) return;
  // Split 0 of each kv head combines every split's partial into the heads' output, in split
  // order (the same bits whichever split finished first).
  constexpr int kGroupSplits = 8;  // splits whose words are in flight together
  u64* out = p.attn_words + static_cast<int64_t>(layer) * q_size;
  for (int i = tid; i < q_words; i += kConsumers) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    const u64* head_parts = parts + static_cast<int64_t>(h * group + g) * p.max_splits * stride;
    float mx = -INFINITY, sum = 0.f, a = 0.f;
    for (int s0 = 0; s0 < splits; s0 += kGroupSplits) {
      // three words per split (its max, its sum and this element), all loads in flight at once
      u64 w[kGroupSplits][3];
#pragma unroll
      for (int s = 0; s < kGroupSplits; ++s) {
        if (s0 + s >= splits) break;
        const u64* part = head_parts + (s0 + s) * stride;
        w[s][0] = ld_relaxed(part + kHeadDim);
        w[s][1] = ld_relaxed(part + kHeadDim + 1);
        w[s][2] = ld_relaxed(part + d);
      }
#pragma unroll
      for (int s = 0; s < kGroupSplits; ++s) {
        if (s0 + s >= splits) break;
        const u64* part = head_parts + (s0 + s) * stride;
        const float ms = await_word(part + kHeadDim, w[s][0], tag);
        const float ls = await_word(part + kHeadDim + 1, w[s][1], tag);
        const float as = await_word(part + d, w[s][2], tag);
        const float m_new = fmaxf(mx, ms);
        if (m_new == -INFINITY) continue;
        const float f_old = exp2f(mx - m_new), f_new = exp2f(ms - m_new);
        sum = sum * f_old + ls * f_new;
        a = a * f_old + as * f_new;
        mx = m_new;
      }
    }
    put_word(out + (h * group + g) * kHeadDim + d, tag, round_bf(sum > 0.f ? a / sum : 0.f));
  }
}

__global__ void __launch_bounds__(kThreads, 1) llama_decode_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + kEmptyOffset);
  int* slot_chunk = reinterpret_cast<int*>(smem + kSlotChunkOffset);
  float* misc = reinterpret_cast<float*>(smem + kMiscOffset);
  u64* misc64 = reinterpret_cast<u64*>(smem + kMiscU64Offset);
  bf16* res = reinterpret_cast<bf16*>(smem + kResidualOffset);
  bf16* xs = reinterpret_cast<bf16*>(smem + p.off_union);
  float* scratch = reinterpret_cast<float*>(smem + p.off_union);
  bf16* ring = reinterpret_cast<bf16*>(smem + p.off_ring);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if (tid == 0) {
    for (int s = 0; s < p.num_slots; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    misc64[0] = *reinterpret_cast<volatile u64*>(p.epoch);
  }
  __syncthreads();
  if (warp == kWarps) {
    if (lane == 0) produce(p, full, empty, slot_chunk, ring);
    return;
  }

  const u64 launches = misc64[0] + 1;  // counters' targets: this many launches' arrivals
  const uint32_t tag = static_cast<uint32_t>(launches % 0xFFFFFFFFull) + 1;  // never 0 (zeroed words)
  const u64 grid = gridDim.x;
  const int q_size = p.num_heads * kHeadDim, kv_size = p.num_kv_heads * kHeadDim;
  u64* counters = p.counters[p.rank];
  u64* stamps = p.stamps ? p.stamps + static_cast<int64_t>(blockIdx.x) * p.num_layers * kStamps : nullptr;
  auto stamp = [&](int layer, int which) {
    if (stamps && tid == 0) stamps[layer * kStamps + which] = now_ns();
  };
  int st = 0;
  for (int layer = 0; layer < p.num_layers; ++layer) {
    const Layer& L = p.layers[layer];
    const int c = layer * kPhases;
    stamp(layer, 0);
    // QKV
    float scale;
    if (layer == 0) {
      scale = operand_add_norm(p, p.hidden_in, 1, res, L.ln1, xs, true, misc);
    } else {
      wait_counter(counters + c - kPhases + kDown, launches * grid * p.world);
      scale = operand_add_norm(p, site(p, p.rank, layer - 1, 1), p.world, res, L.ln1, xs, false, misc);
    }
    stamp(layer, 1);
    u64* qkv = p.qkv_words + static_cast<int64_t>(layer) * (q_size + 2 * kv_size);
    consume(p, 4 * layer, st, full, empty, slot_chunk, ring, xs, [&](int row, float dot) {
      put_word(qkv + row, tag, round_bf(dot * scale));
    });
    stamp(layer, 2);
    consumers_sync();  // every warp is done with xs (the attention scratch shares it)
    // attention (the CTAs with a (kv head, split))
    stamp(layer, 3);
    attention(p, layer, scratch, tag);
    stamp(layer, 4);
    // O
    consumers_sync();  // the attention scratch is free (xs shares it)
    operand_from_words(p.attn_words + static_cast<int64_t>(layer) * q_size, q_size, tag, xs);
    stamp(layer, 5);
    consume(p, 4 * layer + 1, st, full, empty, slot_chunk, ring, xs, [&](int row, float dot) {
      store_partial(p, layer, 0, row, dot);
    });
    stamp(layer, 6);
    arrive(p, c + kO, 0, p.world);
    // gate_up
    wait_counter(counters + c + kO, launches * grid * p.world);
    scale = operand_add_norm(p, site(p, p.rank, layer, 0), p.world, res, L.ln2, xs, false, misc);
    stamp(layer, 7);
    bf16* gate_up = p.gate_up + static_cast<int64_t>(layer) * 2 * p.inter;
    consume(p, 4 * layer + 2, st, full, empty, slot_chunk, ring, xs, [&](int row, float dot) {
      gate_up[row] = __float2bfloat16(dot * scale);
    });
    stamp(layer, 8);
    arrive(p, c + kGateUp, p.rank, p.rank + 1);
    // down
    wait_counter(counters + c + kGateUp, launches * grid);
    operand_silu(gate_up, p.inter, xs);
    stamp(layer, 9);
    consume(p, 4 * layer + 3, st, full, empty, slot_chunk, ring, xs, [&](int row, float dot) {
      store_partial(p, layer, 1, row, dot);
    });
    stamp(layer, 10);
    arrive(p, c + kDown, 0, p.world);
  }
  if (blockIdx.x == 0) {  // the last down projection's sum, and the residual stream
    const int last = p.num_layers - 1;
    wait_counter(counters + last * kPhases + kDown, launches * grid * p.world);
    const bf16* src = site(p, p.rank, last, 1);
    for (int i = tid; i < p.hidden; i += kConsumers) {
      float h = 0.f;
      for (int r = 0; r < p.world; ++r) h += bf(__ldcg(src + static_cast<int64_t>(r) * p.hidden + i));
      p.hidden_out[i] = __float2bfloat16(h);
      p.residual_out[i] = res[i];
    }
  }
  consumers_sync();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(p.epoch + 1, 1ull) == launches * grid - 1) atomicExch(p.epoch, launches);
  }
}

}  // namespace

#ifndef MEGAKERNEL_NO_TORCH
// Shared-memory plan (bytes): the offsets of the operand/scratch union and of the ring, the
// ring's slots and the total.
std::vector<int64_t> plan_smem(int64_t hidden, int64_t q_size, int64_t inter, int64_t group) {
  auto up = [](int64_t x) { return (x + 127) / 128 * 128; };
  const int64_t off_union = kResidualOffset + up(hidden * 2);
  const int64_t scratch = 4 * ((2 * group + 3) * kHeadDim + 2 * kWarps * group + kWarps * group * kHeadDim);
  const int64_t operand = 2 * std::max(hidden, std::max(q_size, inter));
  const int64_t off_ring = off_union + up(std::max(scratch, operand));
  const int64_t slots = std::min<int64_t>(kMaxSlots, (227 * 1024 - off_ring) / kStageBytes);
  return {off_union, off_ring, slots, off_ring + slots * kStageBytes};
}

void llama_decode(torch::Tensor layers, int64_t num_layers, int64_t hidden, int64_t num_heads, int64_t num_kv_heads,
                  int64_t inter, double eps, double scale, torch::Tensor hidden_in, torch::Tensor hidden_out,
                  torch::Tensor residual_out, torch::Tensor positions, torch::Tensor slot_mapping,
                  torch::Tensor seq_lens, torch::Tensor block_table, int64_t block_size, int64_t stride_block,
                  int64_t stride_token, int64_t stride_head, torch::Tensor cos, torch::Tensor sin,
                  torch::Tensor qkv_words, torch::Tensor part_words, torch::Tensor attn_words, torch::Tensor gate_up,
                  std::vector<int64_t> reduce_ptrs, std::vector<int64_t> counter_ptrs,
                  torch::Tensor epoch, torch::Tensor tickets, int64_t rank, int64_t grid, int64_t max_splits,
                  int64_t static_permille, int64_t ahead, c10::optional<torch::Tensor> stamps) {
  const int world = static_cast<int>(reduce_ptrs.size());
  TORCH_CHECK(world >= 1 && world <= kMaxWorld && counter_ptrs.size() == reduce_ptrs.size(), "llama_decode: world");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= kMaxGroup, "llama_decode: heads");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  Params p{};
  p.layers = reinterpret_cast<const Layer*>(layers.data_ptr());
  p.num_layers = num_layers;
  p.hidden = hidden;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.inter = inter;
  p.eps = static_cast<float>(eps);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.hidden_in = reinterpret_cast<const bf16*>(hidden_in.data_ptr());
  p.hidden_out = reinterpret_cast<bf16*>(hidden_out.data_ptr());
  p.residual_out = reinterpret_cast<bf16*>(residual_out.data_ptr());
  p.positions = positions.data_ptr<int64_t>();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.block_table = block_table.data_ptr<int64_t>();
  p.block_size = block_size;
  p.stride_block = stride_block;
  p.stride_token = stride_token;
  p.stride_head = stride_head;
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.rope_stride = cos.stride(0);
  p.qkv_words = reinterpret_cast<u64*>(qkv_words.data_ptr());
  p.part_words = reinterpret_cast<u64*>(part_words.data_ptr());
  p.attn_words = reinterpret_cast<u64*>(attn_words.data_ptr());
  p.gate_up = reinterpret_cast<bf16*>(gate_up.data_ptr());
  for (int r = 0; r < world; ++r) {
    p.reduce[r] = reinterpret_cast<bf16*>(reduce_ptrs[r]);
    p.counters[r] = reinterpret_cast<u64*>(counter_ptrs[r]);
  }
  p.epoch = reinterpret_cast<u64*>(epoch.data_ptr());
  p.rank = rank;
  p.world = world;
  p.max_splits = max_splits;
  p.static_permille = static_permille;
  p.ahead = ahead;
  p.tickets = reinterpret_cast<u64*>(tickets.data_ptr());
  TORCH_CHECK(max_splits >= 1 && max_splits * num_kv_heads <= grid, "llama_decode: attention splits");
  TORCH_CHECK(static_permille >= 0 && static_permille <= 1000, "llama_decode: static share");
  const std::vector<int64_t> plan = plan_smem(hidden, num_heads * kHeadDim, inter, num_heads / num_kv_heads);
  p.off_union = plan[0];
  p.off_ring = plan[1];
  p.num_slots = plan[2];
  TORCH_CHECK(p.num_slots >= 2, "llama_decode: shared memory too small for the ring");
  p.stamps = stamps ? reinterpret_cast<u64*>(stamps->data_ptr()) : nullptr;
  static uint64_t attr_set = 0;
  const int device = hidden_in.get_device();
  if (device >= 64 || !(attr_set >> device & 1)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(llama_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        227 * 1024));
    if (device < 64) attr_set |= uint64_t{1} << device;
  }
  llama_decode_kernel<<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(plan[3]),
                        c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan_smem", &plan_smem, "shared-memory plan (llama_megakernel.cu)");
  m.def("llama_decode", &llama_decode, "one-token Llama decode layers in one kernel (llama_megakernel.cu)");
}
#endif
