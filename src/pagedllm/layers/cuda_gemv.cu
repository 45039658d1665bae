// One-token decode GEMV for bf16 weights (layers/cuda_gemv.py builds and calls it).
//
//   MODE 0: out = W x (+ b)                        x [K]
//   MODE 1: out = W (silu(gate) * up) (+ b)        x [2K] = [gate | up], torch's roundings
//   MODE 2: out = rsqrt(mean(s^2) + eps) * W round(s * nw) (+ b), s = round(h + r); res_out = s
//
// At one token a linear layer is a pure weight stream. One CTA per SM; a producer warp streams
// whole weight rows into a ring of shared-memory stages with bulk copies (cp.async.bulk, the
// copy engine of sm_90), eight consumer warps each reduce whole rows against the input operand
// held in shared memory. What the measurements on an H200 asked for (docs/benchmarks.md,
// twelfth session):
//  - Programmatic dependent launch: the kernel is launched with PDL and lets its successor
//    launch at once; the weights need nothing an earlier kernel writes, so the producer streams
//    before griddepcontrol.wait, which only the consumers (reading the operand) pass. Chains of
//    these GEMVs ran 6-8 us per layer faster with it than without.
//  - Until the operand is in, the producer keeps only `ahead` stages in flight: an SM's loads
//    queue behind its outstanding bulk copies, and an operand read behind a full ring waited
//    3-6 us.
//  - Rows go out in chunks of one stage. Most chunks are assigned statically (CTA c takes a
//    contiguous slab), the rest are handed out through a ticket counter, so CTAs that stream
//    faster take more of the tail (the static split left 7-12 us between the first and the last
//    CTA to finish the largest GEMV).
//
// The all-reduce between a row-parallel GEMV and the add + RMSNorm GEMV after it can ride on the
// two kernels instead of a kernel of its own. A site's buffer (symmetric memory, one per rank)
// holds the ranks' rows as 4-byte words, bf16 | tag << 16 [world][n], then one 8-byte count per
// writing rank; the tag is the site's call count + 1 (mod 2^16; calls: the reader CTAs that took
// their operand, counted by each as it does, over the grid), so a word of the call before never
// passes for this call's. The writer stores each output row into every rank's buffer. The
// reader's consumers load every rank's words at once, in the round trip of their other operand
// loads, and check the tags; a thread whose words are not all in yet (a peer's rows still on
// their way) polls just those until they land (pull_poll, the default). The ranks' values are
// summed in rank order, as the one-shot all-reduce (one_shot_all_reduce.py) would. Each load
// that waits for another costs a round trip of ~1 us while the weights stream: waiting for
// counts first, then loading rank by rank, took 4 us more than a plain operand per site.
// With pull_poll 0, each writer CTA, once its rows are issued, adds their number to its rank's
// count in every buffer, with no fence (a hint: the tags make it safe when a count overtakes its
// rows), and a reader CTA with a stale word has its thread 0 wait until every count reaches
// (calls + 1) * n before its threads reload; that took 6-18 us a step more in L1 at TP=2
// (docs/benchmarks.md, twenty-third session).
// The reader's consumers do not pass griddepcontrol.wait (pull_wait 0, the default): the tags
// vouch for every row, and the writer grid's completion would add the acknowledgement of its
// stores into the peers (~1 us a site on 2 x H200). Its producer still waits before its tickets.
//
// Tickets never need resetting: a launch draws exactly (dynamic chunks + CTAs) tickets, because
// every CTA stops at its first ticket past the chunks; ticket t means chunk t mod (that sum).
// A CTA draws only after griddepcontrol.wait, so launches of one weight never interleave.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cstdint>

#include "cuda_gemv_device.cuh"

namespace {

// 16-byte operand vectors per consumer thread: K <= 16384 (add + RMSNorm input: K <= 8192)
template <int MODE>
constexpr int kMaxVecs = MODE == 2 ? 4 : 8;
constexpr int kMaxSlots = 32;
constexpr int kMaxWorld = 8;
constexpr int kMaxPullWorld = 2;  // ranks a pulled operand sums (its loads are all in flight at once)
constexpr int kStageStamps = 16;   // stages stamped per CTA (Params::stage_stamps)
constexpr int kStageWords = 8;     // words a stamped stage takes (Params::stage_stamps)
// Shared layout: [full barriers][empty barriers][chunk of each slot][misc] | operand | ring
constexpr int kEmptyOffset = 256;
constexpr int kChunkOffset = 512;
constexpr int kMiscOffset = 640;
constexpr int kOperandOffset = 1024;

struct Params {
  const __nv_bfloat16* w;
  const __nv_bfloat16* x;
  const __nv_bfloat16* r;
  const __nv_bfloat16* nw;
  const __nv_bfloat16* bias;
  __nv_bfloat16* out;
  __nv_bfloat16* res_out;
  unsigned long long* tickets;
  unsigned long long* stamps;  // per CTA: start, operand ready, end (ns); null: off
  // per CTA, per stage st < kStageStamps: [the producer issued it, warp 0's wait for its bytes
  // returned, warp 0's rows of it done (ns), its chunk (-1: the end), then SM clocks of warp 0:
  // its wait returned, its last row's products and its sum done, its rows done]; null: off
  unsigned long long* stage_stamps;
  int N, K, rows_per_stage, num_slots, static_chunks, ring_offset;
  int ahead;  // stages in flight before the operand is ready (0: no limit)
  float eps;
  void* push[kMaxWorld];           // MODE 0/1: the site's buffer of each of num_push ranks; else out
  const void* pull;                // MODE 2: this rank's buffer of the site; null: the operand is x
  // push / pull: [1] the reader CTAs that have taken the site's operand, so far. Every GEMV of a
  // site runs one CTA per SM, so this over the grid is the site's completed calls.
  unsigned long long* site_epoch;
  int num_push, rank, world;
  int pull_wait;  // pull: the consumers also wait for the writer grid (griddepcontrol.wait); 0: the tags suffice
  // push / pull: a reader thread with stale words polls them alone, and the writers count no
  // rows; 0: a reader CTA's thread 0 waits for every writer's count first, then its threads reload
  int pull_poll;
};

// The counts after a site buffer's words (n per rank): one per writing rank.
__device__ __forceinline__ unsigned long long* site_counts(const void* buffer, int world, int n) {
  return reinterpret_cast<unsigned long long*>(const_cast<char*>(static_cast<const char*>(buffer)) +
                                               static_cast<int64_t>(world) * n * 4);
}
__device__ __forceinline__ void st_word(void* p, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_volatile(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_volatile_v4(const void* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_cg_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
// A peer that never writes (its process died): fail the launch after kPeerTimeoutNs of polling
// rather than hang the GPU. `check` reads the clock once every 1024 polls.
constexpr unsigned long long kPeerTimeoutNs = 10000000000ull;
struct PeerDeadline {
  unsigned long long since = 0;
  __device__ __forceinline__ void check(unsigned spins) {
    if ((spins & 1023) != 0) return;
    if (since == 0) since = now_ns();
    else if (now_ns() - since > kPeerTimeoutNs) __trap();
  }
};
// Whether all 8 words of a pulled vector carry `tag`.
__device__ __forceinline__ bool tagged(const uint4 (&q)[2], uint32_t tag) {
  const uint32_t* e = reinterpret_cast<const uint32_t*>(q);
  bool fresh = true;
#pragma unroll
  for (int j = 0; j < 8; ++j) fresh &= (e[j] >> 16) == tag;
  return fresh;
}
__device__ __forceinline__ void red_add_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The site's completed calls (see Params::site_epoch). A reader CTA reads them before it counts
// itself, while at most gridDim.x - 1 CTAs of its own call have: the quotient is still exact.
__device__ __forceinline__ unsigned long long site_calls_now(const Params& p) {
  return ld_volatile(p.site_epoch) / gridDim.x;
}

// This CTA's stamps of stage st (see Params::stage_stamps), or null when not stamped.
__device__ __forceinline__ unsigned long long* stage_stamp(const Params& p, int st) {
  return p.stage_stamps != nullptr && st < kStageStamps
             ? p.stage_stamps + (static_cast<int64_t>(blockIdx.x) * kStageStamps + st) * kStageWords
             : nullptr;
}

template <int MODE>
__global__ void __launch_bounds__(kThreads, 1) gemv_m1_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + kEmptyOffset);
  int* slot_chunk = reinterpret_cast<int*>(smem + kChunkOffset);
  float* misc = reinterpret_cast<float*>(smem + kMiscOffset);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + kOperandOffset);
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem + p.ring_offset);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = p.K, R = p.rows_per_stage, S = p.num_slots;
  const int total_chunks = (p.N + R - 1) / R;
  const int static_total = p.static_chunks * gridDim.x;
  const int dynamic_chunks = total_chunks - static_total;
  const int64_t stage_elems = static_cast<int64_t>(R) * K;

  volatile int* operand_ready = reinterpret_cast<volatile int*>(misc + 16);
  if (tid == 0) {
    if (p.stamps) p.stamps[blockIdx.x * 4] = now_ns();
    *operand_ready = 0;
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kWarps) {  // the producer: the weights need nothing an earlier kernel writes
    if (lane != 0) return;
    pdl_trigger();
    int landed = 0;
    const unsigned long long period = static_cast<unsigned long long>(dynamic_chunks) + gridDim.x;
    unsigned long long ticket = 0;
    bool have_ticket = false;
    for (int st = 0;; ++st) {
      const int slot = st % S;
      // Draw the first ticket one stage before the slab ends: CTAs that streamed their slab
      // sooner draw sooner, and the atomic's round trip overlaps the wait for a free slot.
      if (dynamic_chunks > 0 && !have_ticket && st + 1 >= p.static_chunks) {
        // An earlier launch of this weight may still be drawing: PDL starts this grid early.
        pdl_wait();
        ticket = atomicAdd(p.tickets, 1ull);
        have_ticket = true;
      }
      if (st >= S) mbar_wait(&empty[slot], ((st / S) - 1) & 1);
      // Until the operand is in, keep only `ahead` stages in flight: the operand's loads queue
      // behind this SM's outstanding bulk copies.
      while (p.ahead && st - landed >= p.ahead && !*operand_ready) {
        if (mbar_test(&full[landed % S], (landed / S) & 1)) ++landed;
      }
      int chunk = -1;
      if (st < p.static_chunks) {
        chunk = blockIdx.x * p.static_chunks + st;
      } else if (dynamic_chunks > 0) {
        const int local = static_cast<int>(ticket % period);
        if (local < dynamic_chunks) {
          chunk = static_total + local;
          ticket = atomicAdd(p.tickets, 1ull);
        }
      }
      slot_chunk[slot] = chunk;
      if (unsigned long long* at = stage_stamp(p, st)) {
        at[0] = now_ns();
        at[3] = static_cast<unsigned long long>(static_cast<int64_t>(chunk));
      }
      if (chunk < 0) {  // no more rows: release the consumers
        mbar_arrive(&full[slot]);
        return;
      }
      const int rows_in = min(R, p.N - chunk * R);
      const uint32_t bytes = static_cast<uint32_t>(rows_in) * K * 2;
      mbar_expect_tx(&full[slot], bytes);
      bulk_load(ring + slot * stage_elems, p.w + static_cast<int64_t>(chunk) * R * K, bytes, &full[slot]);
    }
  }

  // Consumers: wait for the kernel that wrote the operand (a no-op without PDL), then issue
  // every operand load at once: each load that waits for another costs a round trip (~0.7 us
  // with the weight stream in flight), and the pulled operand below once took seven of them.
  const bool pulling = MODE == 2 && p.pull != nullptr;
  // A pulled operand's rows are vouched for by their tags, so its consumers need not wait for the
  // writer grid to complete (its stores into the peers acknowledged): `pull_wait` 0 skips it. Its
  // residual was written two kernels back, by a grid that completed before any writer CTA passed
  // its own wait, and this CTA holds an SM only after a writer CTA left it; it is read past L1.
  const bool skip_wait = pulling && !p.pull_wait;
  if (!skip_wait) pdl_wait();
  // The site's calls: stable from the writer's start until the reader's CTAs count themselves
  // (the next writer starts after that reader). A reader's threads read them with its words
  // (below); a writer needs them only for its first stored row.
  unsigned long long site_calls = p.site_epoch != nullptr && !pulling ? site_calls_now(p) : 0;
  const int kv = K / 8;  // 16-byte vectors of one row
  constexpr int kArrays = MODE == 0 ? 1 : (MODE == 1 ? 2 : 3);
  uint4 in[kArrays][kMaxVecs<MODE>];
  // What no peer writes: x (unless pulled), the gated form's up half, the residual, the norm weight.
#pragma unroll
  for (int i = 0; i < kMaxVecs<MODE>; ++i) {
    const int v = tid + i * kConsumers;
    if (v < kv) {
      if (!pulling) in[0][i] = reinterpret_cast<const uint4*>(p.x)[v];
      if constexpr (MODE == 1) in[1][i] = reinterpret_cast<const uint4*>(p.x + K)[v];
      if constexpr (MODE == 2) {
        in[1][i] = skip_wait ? ld_cg_v4(p.r + v * 8) : reinterpret_cast<const uint4*>(p.r)[v];
        in[2][i] = reinterpret_cast<const uint4*>(p.nw)[v];
      }
    }
  }
  if constexpr (MODE == 2) {
    if (pulling) {  // a pulled operand (see the top of the file): every rank's rows, summed in rank order
      // Optimistically, in the round trip of the loads above: the site's calls (each thread reads
      // the one word) and every rank's words. Their tags say whether all rows are in.
      const uint32_t* words = static_cast<const uint32_t*>(p.pull);
      site_calls = site_calls_now(p);
      uint4 q[kMaxVecs<MODE>][kMaxPullWorld][2];
#pragma unroll
      for (int i = 0; i < kMaxVecs<MODE>; ++i) {
        const int v = tid + i * kConsumers;
#pragma unroll
        for (int r = 0; r < kMaxPullWorld; ++r) {
          if (v < kv && r < p.world) {
            const uint32_t* at = words + static_cast<int64_t>(r) * K + v * 8;
            q[i][r][0] = ld_volatile_v4(at);  // 4-byte words land whole
            q[i][r][1] = ld_volatile_v4(at + 4);
          }
        }
      }
      const uint32_t tag = static_cast<uint32_t>((site_calls + 1) & 0xFFFFu);
      bool stale = false;
#pragma unroll
      for (int i = 0; i < kMaxVecs<MODE>; ++i) {
#pragma unroll
        for (int r = 0; r < kMaxPullWorld; ++r) {
          if (tid + i * kConsumers < kv && r < p.world) stale |= !tagged(q[i][r], tag);
        }
      }
      // pull_poll: a thread with stale words polls just those (the writers count no rows), and
      // each lands as soon as its writer CTA stored it, not when the last one counted its rows.
      if (p.pull_poll ? stale : consumers_any(stale)) {
        // A peer's rows are still on their way. Polled (the default): each thread with stale
        // words polls just those, a short sleep between polls. Counted: one thread waits for
        // every rank's count, then each thread reloads its stale words, and polls any a count
        // overtook (rare) until it lands.
        if (!p.pull_poll && tid == 0) {
          const unsigned long long* counts = site_counts(p.pull, p.world, K);
          const unsigned long long target = (site_calls + 1) * static_cast<unsigned long long>(K);
          PeerDeadline deadline;
          for (int r = 0; r < p.world; ++r) {
            for (unsigned spins = 1; ld_volatile(counts + r) < target; ++spins) deadline.check(spins);
          }
        }
        if (!p.pull_poll) consumers_sync();
#pragma unroll
        for (int i = 0; i < kMaxVecs<MODE>; ++i) {
          const int v = tid + i * kConsumers;
#pragma unroll
          for (int r = 0; r < kMaxPullWorld; ++r) {
            if (v >= kv || r >= p.world) continue;
            const uint32_t* at = words + static_cast<int64_t>(r) * K + v * 8;
            PeerDeadline deadline;
            for (unsigned spins = 1; !tagged(q[i][r], tag); ++spins) {
              if (p.pull_poll) __nanosleep(64);  // the polls of every stale thread share L2 and NVLink
              q[i][r][0] = ld_volatile_v4(at);
              q[i][r][1] = ld_volatile_v4(at + 4);
              deadline.check(spins);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kMaxVecs<MODE>; ++i) {
        if (tid + i * kConsumers >= kv) continue;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int r = 0; r < kMaxPullWorld; ++r) {
          if (r >= p.world) continue;
          const uint32_t* e = reinterpret_cast<const uint32_t*>(q[i][r]);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] += bf(__ushort_as_bfloat16(static_cast<unsigned short>(e[j] & 0xFFFFu)));
        }
        __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&in[0][i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = __float2bfloat16(acc[j]);
      }
    }
  }
  const uint32_t tag = static_cast<uint32_t>((site_calls + 1) & 0xFFFFu);
  float ssq = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVecs<MODE>; ++i) {
    const int v = tid + i * kConsumers;
    if (v >= kv) continue;
    uint4 packed;
    __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
    if constexpr (MODE == 0) {
      packed = in[0][i];
    } else if constexpr (MODE == 1) {
      const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(&in[0][i]);
      const __nv_bfloat16* u = reinterpret_cast<const __nv_bfloat16*>(&in[1][i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float gf = bf(g[j]);
        // silu rounded to bf16 before the product, as torch (and layers/triton_fused.py) do
        const float act = bf(__float2bfloat16(__fdividef(gf, 1.f + __expf(-gf))));
        o[j] = __float2bfloat16(act * bf(u[j]));
      }
    } else {
      const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&in[0][i]);
      const __nv_bfloat16* rr = reinterpret_cast<const __nv_bfloat16*>(&in[1][i]);
      const __nv_bfloat16* nn = reinterpret_cast<const __nv_bfloat16*>(&in[2][i]);
      uint4 s4;
      __nv_bfloat16* s = reinterpret_cast<__nv_bfloat16*>(&s4);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j] = __float2bfloat16(bf(h[j]) + bf(rr[j]));
        const float sf = bf(s[j]);
        ssq += sf * sf;
        o[j] = __float2bfloat16(sf * bf(nn[j]));
      }
      if (blockIdx.x == 0) reinterpret_cast<uint4*>(p.res_out)[v] = s4;
    }
    reinterpret_cast<uint4*>(xs)[v] = packed;
  }
  float scale = 1.f;
  if constexpr (MODE == 2) {
    ssq = warp_sum(ssq);
    if (lane == 0) misc[warp] = ssq;
    consumers_sync();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += misc[i];
    scale = rsqrtf(total / K + p.eps);
  }
  consumers_sync();
  if (tid == 0) *operand_ready = 1;
  // This CTA is done with the site's words (every consumer loaded its own before the barrier
  // above): it counts itself now, fire and forget. Counting on its way out instead (the last CTA
  // advancing the calls behind a fence and a returning atomic) kept each reader grid ~0.5 us
  // longer (docs/benchmarks.md, twenty-third session).
  if (pulling && tid == 0) red_add_sys(p.site_epoch, 1ull);
  if (p.stamps && tid == 0) p.stamps[blockIdx.x * 4 + 1] = now_ns();

  // Stage st holds chunk slot_chunk[slot]: R rows, row j going to warp (st * R + j) % kWarps.
  // Every warp waits for every stage before releasing it, so an arrival always counts toward
  // that stage's phase.
  const uint4* xv = reinterpret_cast<const uint4*>(xs);
  const bool pushing = MODE != 2 && p.num_push > 0;
  unsigned long long rows_done = 0;  // by this CTA (every consumer thread sees every stage)
  for (int st = 0;; ++st) {
    const int slot = st % S;
    mbar_wait(&full[slot], (st / S) & 1);
    unsigned long long* stage_at = tid == 0 ? stage_stamp(p, st) : nullptr;
    if (stage_at) stage_at[1] = now_ns(), stage_at[4] = clock64();
    const int chunk = slot_chunk[slot];
    if (chunk < 0) break;
    const int rows_in = min(R, p.N - chunk * R);
    rows_done += rows_in;
    const __nv_bfloat16* ws = ring + slot * stage_elems;
    const int first = st * R;
    for (int j = ((warp - first % kWarps) + kWarps) % kWarps; j < rows_in; j += kWarps) {
      const float partial = row_partial(reinterpret_cast<const uint4*>(ws + static_cast<int64_t>(j) * K), xv, kv, lane);
      if (stage_at) stage_at[5] = clock64();
      const float sum = warp_sum(partial);
      if (stage_at) stage_at[6] = clock64();
      // Every lane holds the same sum (each butterfly step adds a pair of equal partials in
      // either order). Pushing, lane r stores the row into rank r's buffer, so the stores to the
      // ranks go out side by side: two pushes from one lane in turn took ~100-250 SM cycles a
      // row more than a plain store, on the warp's path to its next row (docs/benchmarks.md,
      // twenty-first session).
      if (pushing ? lane < p.num_push : lane == 0) {
        const int row = chunk * R + j;
        float y = sum * scale;
        if (p.bias != nullptr) y += bf(p.bias[row]);
        if (pushing) {  // this rank's partial row, into rank `lane`'s buffer
          const int64_t at = static_cast<int64_t>(p.rank) * p.N + row;
          st_word(static_cast<uint32_t*>(p.push[lane]) + at, tag << 16 | __bfloat16_as_ushort(__float2bfloat16(y)));
        } else {
          p.out[row] = __float2bfloat16(y);
        }
      }
    }
    __syncwarp();
    if (stage_at) stage_at[2] = now_ns(), stage_at[7] = clock64();
    if (lane == 0) mbar_arrive(&empty[slot]);
  }
  if (p.stamps) {
    consumers_sync();
    if (tid == 0) p.stamps[blockIdx.x * 4 + 2] = now_ns();
  }
  if (pushing && !p.pull_poll) {  // this CTA's rows are out: count them in every rank's buffer
    consumers_sync();
    if (tid == 0 && rows_done > 0) {  // no fence: the count is a hint (see the top of the file)
      for (int r = 0; r < p.num_push; ++r) red_add_sys(site_counts(p.push[r], p.world, p.N) + p.rank, rows_done);
    }
  }
}

const __nv_bfloat16* bf16_ptr(const c10::optional<torch::Tensor>& t) {
  return t ? reinterpret_cast<const __nv_bfloat16*>(t->data_ptr()) : nullptr;
}

}  // namespace

// out[1, N] = the MODE's product; see the top of the file. Shapes and dtypes are checked by the
// Python wrapper; rows_per_stage, num_slots, grid and static_chunks come from its plan.
void gemv_m1(int64_t mode, torch::Tensor w, torch::Tensor x, c10::optional<torch::Tensor> r,
             c10::optional<torch::Tensor> nw, c10::optional<torch::Tensor> bias, torch::Tensor out,
             c10::optional<torch::Tensor> res_out, torch::Tensor tickets, double eps, int64_t rows_per_stage,
             int64_t num_slots, int64_t grid, int64_t static_chunks, int64_t ahead, bool pdl,
             c10::optional<torch::Tensor> stamps, std::vector<int64_t> push, c10::optional<torch::Tensor> pull,
             c10::optional<torch::Tensor> site_epoch, int64_t rank, int64_t world, bool pull_wait, bool pull_poll,
             c10::optional<torch::Tensor> stage_stamps) {
  const int N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 8 == 0 && K / 8 <= (mode == 2 ? kMaxVecs<2> : kMaxVecs<0>) * kConsumers,
              "gemv_m1: unsupported K ", K);
  TORCH_CHECK(num_slots >= 1 && num_slots <= kMaxSlots, "gemv_m1: num_slots out of range");
  const c10::cuda::CUDAGuard guard(w.device());
  Params p;
  p.w = reinterpret_cast<const __nv_bfloat16*>(w.data_ptr());
  p.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  p.r = bf16_ptr(r);
  p.nw = bf16_ptr(nw);
  p.bias = bf16_ptr(bias);
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.res_out = res_out ? reinterpret_cast<__nv_bfloat16*>(res_out->data_ptr()) : nullptr;
  p.tickets = reinterpret_cast<unsigned long long*>(tickets.data_ptr());
  p.stamps = stamps ? reinterpret_cast<unsigned long long*>(stamps->data_ptr()) : nullptr;
  TORCH_CHECK(!stage_stamps || stage_stamps->numel() >= grid * kStageStamps * kStageWords, "gemv_m1: stage_stamps too small");
  p.stage_stamps = stage_stamps ? reinterpret_cast<unsigned long long*>(stage_stamps->data_ptr()) : nullptr;
  p.N = N;
  p.K = K;
  p.rows_per_stage = rows_per_stage;
  p.num_slots = num_slots;
  p.static_chunks = static_chunks;
  p.ring_offset = (kOperandOffset + K * 2 + 127) / 128 * 128;
  p.eps = static_cast<float>(eps);
  p.ahead = static_cast<int>(ahead);
  // The all-reduce on the GEMVs' backs (see the top of the file): push (MODE 0/1) or pull (MODE 2).
  TORCH_CHECK(world <= kMaxWorld && static_cast<int64_t>(push.size()) <= world && rank < world,
              "gemv_m1: bad site (world ", world, ", rank ", rank, ", ", push.size(), " buffers)");
  TORCH_CHECK(push.empty() || mode != 2, "gemv_m1: push is for the plain and gated forms");
  TORCH_CHECK((push.empty() && !pull) || site_epoch, "gemv_m1: push / pull need the site's epoch");
  TORCH_CHECK(!pull || (mode == 2 && pull->nbytes() == static_cast<size_t>(world) * (K * 4 + 8)),
              "gemv_m1: pull is for the add + RMSNorm form, from a site buffer of ", world, " ranks of ", K);
  TORCH_CHECK(!pull || world <= kMaxPullWorld, "gemv_m1: a pulled operand sums at most ", kMaxPullWorld, " ranks");
  for (int r = 0; r < kMaxWorld; ++r)
    p.push[r] = r < static_cast<int>(push.size()) ? reinterpret_cast<void*>(push[r]) : nullptr;
  p.num_push = static_cast<int>(push.size());
  p.pull = pull ? pull->data_ptr() : nullptr;
  p.site_epoch = site_epoch ? reinterpret_cast<unsigned long long*>(site_epoch->data_ptr()) : nullptr;
  p.rank = static_cast<int>(rank);
  p.world = static_cast<int>(world);
  p.pull_wait = pull_wait ? 1 : 0;
  p.pull_poll = pull_poll ? 1 : 0;
  const int64_t smem = p.ring_offset + num_slots * rows_per_stage * static_cast<int64_t>(K) * 2;
  TORCH_CHECK(smem <= 227 * 1024, "gemv_m1: shared memory plan too large: ", smem);
  static uint64_t attr_set[3] = {0, 0, 0};  // per mode, a bit per device
  const int device = w.get_device();
  auto go = [&](auto kernel) {
    if (device >= 64 || !(attr_set[mode] >> device & 1)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
      if (device < 64) attr_set[mode] |= uint64_t{1} << device;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = at::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  };
  if (mode == 0) go(gemv_m1_kernel<0>);
  else if (mode == 1) go(gemv_m1_kernel<1>);
  else go(gemv_m1_kernel<2>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv_m1", &gemv_m1, "one-token bf16 GEMV (cuda_gemv.cu)"); }
