"""Skinny GEMM (GEMV) for a few tokens: y[M, N] = x[M, K] @ W[N, K]^T + b for M <= 16.

At decode batch sizes a linear layer is a pure weight stream: the FLOPs are negligible and the
time is the weight bytes over memory bandwidth. cuBLAS picks tile shapes and split-K for
compute-bound GEMMs; at M = 1 on an H200 it was profiled reading the QKV and O projections of
Llama-3.1-8B at 2.6-3.1 TB/s of the card's ~4.3. This kernel is built for the stream instead:

- Program (n-block, k-split) owns BLOCK_N output columns for all M rows and walks its
  [BLOCK_N, K / SPLIT_K] weight slab in BLOCK_K tiles, so each weight byte is read once. Loads
  are pipelined (num_stages) so ~30-100 KB per SM are in flight.
- Two inner products, picked per shape by the tuner: `tl.dot` of the weight tile with the x tile
  padded to 16 rows (masked rows fetch nothing), with the weight as the 64/32-row operand
  ("swap AB", so a 64-row weight tile can use wgmma), or, for M <= 2, an elementwise multiply
  into a [BLOCK_N, BLOCK_K] fp32 accumulator reduced once after the loop.
- Split-K, when N / BLOCK_N leaves SMs idle, writes fp32 partials [SPLIT_K, M, N]; a second
  kernel sums them in a fixed order (no atomics: results are bitwise reproducible).
- The config is tuned once per (N, K, dtype, M bucket) at the first CUDA call (the engine's
  warm-up before CUDA-graph capture) over a short candidate list; during a capture, or under
  TRITON_INTERPRET=1, a heuristic picks without timing.

M and x's row stride are `do_not_specialize` (a new batch size never recompiles); N and K are
specialised ints, fixed per layer: K is also the weight's row stride, and when it is divisible
by 16 (every real hidden size) Triton proves the rows 16-byte aligned and streams them with
16-byte cp.async. No host syncs: every launch is CUDA-graph capturable. Accumulation is fp32;
the output has x's dtype.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.attention import triton_backend
from pagedllm.layers import cuda_gemv
from pagedllm.layers.triton_fused import gated_act_tile

logger = logging.getLogger(__name__)

MAX_M = 16  # the largest token count the kernel is built (and tuned) for
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DOT_M = 16  # x rows padded to this for tl.dot (its smallest operand size on every Triton 3.x)
_REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration of the skinny GEMM."""

    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 4
    # Not a Triton launch: cuBLAS (torch.addmm / mm), chosen where the tuner finds it faster.
    use_cublas: bool = False
    # Not a Triton launch: the bulk-copy CUDA GEMV of layers/cuda_gemv.py (M = 1, bf16, sm_90+).
    use_cuda: bool = False

    def __str__(self) -> str:
        if self.use_cublas:
            return "cuBLAS"
        if self.use_cuda:
            return "CUDA bulk-copy GEMV"
        kind = "dot" if self.use_dot else "fma"
        return (f"{kind} BLOCK_N={self.block_n} BLOCK_K={self.block_k} SPLIT_K={self.split_k} "
                f"warps={self.num_warps} stages={self.num_stages}")


@triton.jit
def _load_x(ptrs, mask, K, MASKED: tl.constexpr, ACT: tl.constexpr):
    """One x tile at `ptrs` (masked loads read 0), or act(gate) * up of a gated x, up K further.

    A masked-off gate reads 0 and act(0) * 0 == 0, so masking stays exact for gated input.
    """
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if ACT != 0:
        if MASKED:
            up = tl.load(ptrs + K, mask=mask, other=0.0)
        else:
            up = tl.load(ptrs + K)
        x = gated_act_tile(x, up, ACT == 2)
    return x


@triton.jit
def load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] weight tile, masked only where the shape needs it."""
    if EVEN_N and EVEN_K:
        w = tl.load(w_ptrs)
    elif EVEN_K:
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    return w


@triton.jit(do_not_specialize=["M", "stride_xm"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, stride_xm, N, K,
    X_ALIGN: tl.constexpr, M_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr,
    ACT: tl.constexpr = 0,
):
    """Program (n-block, k-split): out[:M, n-block] (+ bias), or its fp32 partial when split.

    ACT (0: none, 1: SiLU, 2: GELU-tanh) makes x a gated input [M, 2K] = [gate | up]: each
    loaded K-chunk is act(gate) * up, computed as the unfused activation kernel would.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, M_BLOCK)
    m_ok = offs_m < M
    # The wrapper guarantees the hint (X_ALIGN is 1 otherwise): 16-byte vector loads of x rows.
    # (On a tensor: Triton drops the hint on a scalar argument.)
    x_rows = tl.multiple_of(offs_m.to(tl.int64) * stride_xm, X_ALIGN)
    # Splits start on tile boundaries, so only the tile holding K (when K % BLOCK_K != 0) is
    # partial; a split past K runs no tiles and writes a zero partial.
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    num_tiles = tl.cdiv(tl.minimum(K - k_lo, k_per_split), BLOCK_K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    # 64-bit row offsets: an LM head [vocab, hidden] can pass 2^31 elements.
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    if USE_DOT:
        x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, M_BLOCK), dtype=tl.float32)
    else:
        # M_BLOCK == M (1 or 2) here. Each x row is its own vector, laid out along the weight
        # tile's K; the products accumulate per lane and are reduced over K once, after the loop.
        x0_ptrs = x_ptr + offs_k
        # (The hint on the sum: it would fold away on a splat of the stride.)
        x1_ptrs = x_ptr + tl.multiple_of(stride_xm + offs_k, X_ALIGN)
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # The loop's own num_stages also pipelines (cp.async) loads that do not feed a tl.dot.
    for i in tl.range(0, num_tiles, num_stages=NUM_STAGES):
        k_ok = offs_k + i * BLOCK_K < K
        w = load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
        if USE_DOT:
            # Padded rows (m >= M) are masked: their loads fetch nothing.
            if EVEN_K:
                xt = _load_x(x_ptrs, m_ok[:, None], K, True, ACT)
            else:
                xt = _load_x(x_ptrs, m_ok[:, None] & k_ok[None, :], K, True, ACT)
            if DOT_UPCAST:  # the interpreter cannot multiply 16-bit tiles: do it in fp32 there
                acc = tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K
        else:
            wf = w.to(tl.float32)
            x0 = _load_x(x0_ptrs, k_ok, K, not EVEN_K, ACT)
            acc0 += wf * x0.to(tl.float32)[None, :]
            if M_BLOCK > 1:
                x1 = _load_x(x1_ptrs, k_ok, K, not EVEN_K, ACT)
                acc1 += wf * x1.to(tl.float32)[None, :]
            x0_ptrs += BLOCK_K
            x1_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        dst = out_ptr
    else:  # the fp32 partial of split pid_k, in a workspace [SPLIT_K, M, N]
        dst = out_ptr + pid_k * M * N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if USE_DOT:
        # acc is [BLOCK_N, M_BLOCK]: store it transposed through the pointers, not a shuffle.
        out = acc + bias[:, None]
        tl.store(dst + offs_m[None, :] * N + offs_n[:, None], out.to(dst.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])
    else:
        tl.store(dst + offs_n, (tl.sum(acc0, axis=1) + bias).to(dst.dtype.element_ty), mask=n_ok)
        if M_BLOCK > 1:
            tl.store(dst + N + offs_n, (tl.sum(acc1, axis=1) + bias).to(dst.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["total"])
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, out_ptr, total, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out.flat[i] = sum_s partial[s].flat[i] (+ bias[i % N]), s in order 0..SPLIT_K-1."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on CPU: the heuristic then plans for an H100/H200)."""
    return triton_backend.num_sms(device, cpu_default=132)


def m_bucket(m: int) -> int:
    """The tuning bucket of a token count: 1, 2, or 16 (3..16 share the padded tl.dot kernel)."""
    return m if m <= 2 else MAX_M


def _split_for(n_blocks: int, k_tiles: int, sms: int) -> int:
    """Power-of-two K split (<= 8) that brings the grid to ~90% of a wave, each split >= 2 tiles.

    Idle SMs cost little while the busy ones can pull more than their share of bandwidth, so a
    grid of 128 programs on 132 SMs is not split (the second pass would cost more).
    """
    split = 1
    while n_blocks * split < 0.9 * sms and split < 8 and k_tiles // (split * 2) >= 2:
        split *= 2
    return split


# Tile shapes the tuner tries: (BLOCK_N, bytes of one weight row per tile, tl.dot, warps, stages).
# Each keeps 32-64 KB of weight in flight per program (stages - 1 tiles ahead).
_BASES = (
    (32, 512, True, 4, 4),  # mma.sync, 16 KB tiles: 60 regs, 72 KB smem (3 programs per SM)
    (64, 256, True, 4, 4),  # 64-row weight operand -> wgmma; 16 KB tiles, 80 KB smem
    (16, 512, True, 4, 5),  # 8 KB tiles, 4 ahead: twice the programs, for small N
    (64, 512, True, 8, 3),  # wgmma, 32 KB tiles, 120 KB smem: fewer, longer programs for large N
)
# The elementwise path for M <= 2: fp32 accumulators of BLOCK_N x BLOCK_K per x row (sm_90,
# 16-bit: 118 / 199 regs for M = 1 / 2 in the first, 80 / 117 in the second).
_FMA_BASES = (
    (32, 512, False, 4, 4),
    (16, 1024, False, 8, 4),
)


def candidate_configs(n: int, k: int, m: int, dtype: torch.dtype, sms: int) -> list[GemvConfig]:
    """The short list the tuner times for one shape (at most 8; the first is the heuristic pick).

    Byte budget: at ~0.7 us of loaded DRAM latency, 48 KB in flight sustains ~65 GB/s per
    program, twice an SM's share of 4.3 TB/s. Tiles are sized in bytes, so fp32 tiles hold
    half the K of 16-bit ones.
    """
    elem = 4 if dtype == torch.float32 else 2
    bases = _BASES + (_FMA_BASES if m_bucket(m) <= 2 else ())
    configs = []
    for block_n, row_bytes, use_dot, warps, stages in bases:
        block_k = row_bytes // elem
        split = _split_for(triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
        configs.append(GemvConfig(block_n, block_k, split, use_dot, warps, stages))
    first, narrow = configs[0], configs[2]
    if first.split_k == 1 and triton.cdiv(n, first.block_n) < 2 * sms and triton.cdiv(k, first.block_k) >= 4:
        # The first tile shape with twice the programs (a second wave's worth of split-K).
        configs.append(GemvConfig(first.block_n, first.block_k, 2, True, first.num_warps, first.num_stages))
    if narrow.split_k > 1:
        # Small weights: the split's second pass may cost more than idle SMs do.
        configs.append(GemvConfig(narrow.block_n, narrow.block_k, 1, True, narrow.num_warps, narrow.num_stages))
    return configs[:8]


def heuristic_config(n: int, k: int, m: int, dtype: torch.dtype, sms: int) -> GemvConfig:
    """The untimed choice: tl.dot over 32 columns x 512-byte rows, split-K to fill the SMs."""
    return candidate_configs(n, k, m, dtype, sms)[0]


# (variant, device index, N, K, dtype, M bucket) -> the tuned config. Variant "" is the plain GEMM;
# the fused variants (gated input, add + RMSNorm) are tuned apart.
_tuned: dict[tuple[str, int, int, int, torch.dtype, int], GemvConfig] = {}

# Gated inputs: the `act` names skinny_linear takes -> the kernel's ACT.
GATED_ACTS = {"silu": 1, "gelu_tanh": 2}


# The tuner's baseline: a Triton config must beat it by CUBLAS_MARGIN to be used.
CUBLAS = GemvConfig(0, 0, use_cublas=True)
CUBLAS_MARGIN = 0.97
# One more candidate where layers/cuda_gemv.py serves the shape (see cuda_candidates).
CUDA_GEMV = GemvConfig(0, 0, use_cuda=True)


def cuda_candidates(x: torch.Tensor, weight: torch.Tensor, mode: str) -> list[GemvConfig]:
    """[CUDA_GEMV] when the CUDA GEMV serves x times weight in `mode` here (building it on the
    first call), else []."""
    if cuda_gemv.supports(x, weight, mode) and cuda_gemv.available():
        return [CUDA_GEMV]
    return []


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            config: GemvConfig, act: str | None = None) -> torch.Tensor:
    if config.use_cuda:
        if cuda_gemv.aligned(x, weight):
            return cuda_gemv.gemv("silu" if act == "silu" else "plain", x, weight, out, bias)
        config = heuristic_config(*weight.shape, x.shape[0], x.dtype, num_sms(x.device))  # an unaligned view
    if config.use_cublas:
        if act is not None:  # unfused: the activation kernel, then the matmul
            from pagedllm.layers import triton_fused

            x = triton_fused.gelu_tanh_and_mul(x) if act == "gelu_tanh" else triton_fused.silu_and_mul(x)
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)
    m = x.shape[0]
    n, k = weight.shape
    interpret = _interpreting()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = interpret and x.dtype != torch.float32
    use_dot = config.use_dot
    if not use_dot and m > 2:
        raise ValueError(f"the elementwise GEMV path serves at most 2 rows, got {m}")
    m_block = _DOT_M if use_dot else m
    elem = x.element_size()
    x_align = 16 // elem if x.stride(0) % (16 // elem) == 0 else 1
    split = config.split_k
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else weight
    _skinny_gemm_kernel[(triton.cdiv(n, config.block_n), split)](
        x, weight, bias_arg, target,
        m, x.stride(0), n, k,
        X_ALIGN=x_align, M_BLOCK=m_block, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=split, USE_DOT=use_dot, EVEN_N=n % config.block_n == 0,
        EVEN_K=k % config.block_k == 0,
        HAS_BIAS=bias is not None and split == 1, DOT_PREC=precision, DOT_UPCAST=upcast,
        NUM_STAGES=config.num_stages, ACT=GATED_ACTS[act] if act is not None else 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split > 1:
        total = m * n
        _split_k_reduce_kernel[(triton.cdiv(total, _REDUCE_BLOCK),)](
            target, bias_arg, out, total, n,
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, num_warps=4,
        )
    return out


_TUNE_REPS = 10
_SLEEP_CYCLES = 200_000  # ~0.1 ms of GPU spin: longer than the host takes to enqueue a launch


def _l2_flush_buffer(device: torch.device, weight_bytes: int) -> torch.Tensor | None:
    """A buffer twice the L2 to read between timed calls, or None when the weight alone evicts
    the L2 (or there is no memory to spare: the tuner runs after the KV cache is allocated)."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    if weight_bytes >= 2 * l2_bytes:
        return None
    try:
        return torch.empty(2 * l2_bytes // 4, dtype=torch.float32, device=device)
    except torch.cuda.OutOfMemoryError:
        return None


def _tune(launch: Callable[[GemvConfig], object], weight: torch.Tensor, m: int, dtype: torch.dtype,
          candidates: list[GemvConfig], variant: str = "") -> GemvConfig:
    """The fastest candidate by median time of `launch(config)`, with a cold L2 (in decode the
    weights stream from DRAM). A few ms per candidate: each call is timed alone, after an L2
    flush and a spin that covers the host's launch cost, so the events time the kernels only.
    CUBLAS is the baseline (for a fused variant, `launch` runs it unfused)."""
    device = weight.device
    flush = _l2_flush_buffer(device, weight.numel() * weight.element_size())
    best, best_ms = candidates[0], float("inf")
    cublas_ms = float("inf")
    for config in [CUBLAS, *candidates]:
        try:
            for _ in range(2):  # compile and warm up
                launch(config)
            events = []
            for _ in range(_TUNE_REPS):
                if flush is not None:
                    flush.sum()  # a read: written lines would be written back during the timed call
                torch.cuda._sleep(_SLEEP_CYCLES)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(config)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is skipped
            logger.warning("skinny GEMM config %s failed for N=%d K=%d: %s", config, *weight.shape, exc)
            continue
        ms = statistics.median(start.elapsed_time(end) for start, end in events)
        if config.use_cublas:
            cublas_ms = ms
        elif ms < best_ms:
            best, best_ms = config, ms
    if best_ms > CUBLAS_MARGIN * cublas_ms:
        # Not clearly faster: keep cuBLAS (and its numerics), so a near-tie in timing noise does
        # not decide between two kernels.
        best, best_ms = CUBLAS, cublas_ms
    logger.info("skinny GEMM%s N=%d K=%d M=%d %s: %s (%.1f us)", f" ({variant})" if variant else "",
                weight.shape[0], weight.shape[1], m, str(dtype).removeprefix("torch."), best, best_ms * 1e3)
    return best


def tuned_config(variant: str, m: int, weight: torch.Tensor, dtype: torch.dtype,
                 launch: Callable[[GemvConfig], object],
                 candidates: Callable[[int, int, int, torch.dtype, int], list[GemvConfig]] = candidate_configs,
                 extra: Callable[[], list[GemvConfig]] = list,
                 ) -> GemvConfig:
    """The config of kernel variant `variant` ("" for the plain GEMM) for M rows times `weight`
    [N, K]: tuned by timing `launch` on the first eager CUDA call (over `candidates` and
    `extra()`, the non-Triton kernels that serve this call), else the first candidate."""
    n, k = weight.shape
    device = weight.device
    sms = num_sms(device)
    key = (variant, device.index if device.type == "cuda" and device.index is not None else -1, n, k, dtype,
           m_bucket(m))
    config = _tuned.get(key)
    if config is not None:
        return config
    if device.type != "cuda" or _interpreting() or torch.cuda.is_current_stream_capturing():
        # Timing is impossible here (CPU) or would break the capture: use the heuristic, and
        # do not cache it, so the next eager CUDA call still tunes.
        return candidates(n, k, m, dtype, sms)[0]
    others = extra()
    if CUDA_GEMV in others and cuda_gemv.preferred(weight):
        config = CUDA_GEMV
    else:
        config = _tune(launch, weight, m, dtype, candidates(n, k, m, dtype, sms) + others, variant)
    _tuned[key] = config
    return config


def get_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, act: str | None = None) -> GemvConfig:
    """The config skinny_linear uses for this shape (and gated `act`): tuned on first CUDA use,
    else the heuristic. A gated input is tuned apart: its act costs time in every program."""
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, weight.shape[0]), dtype=x.dtype, device=x.device)
    return tuned_config(act or "", m, weight, x.dtype, lambda config: _launch(x, weight, bias, out, config, act),
                        extra=lambda: cuda_candidates(x, weight, act or "plain"))


def tuned_configs() -> dict[tuple[int, int, int, torch.dtype, int], GemvConfig]:
    """The plain GEMM's configs chosen so far, keyed by (device index, N, K, dtype, M bucket)."""
    return {key[1:]: config for key, config in _tuned.items() if not key[0]}


def tuned_variant_configs() -> dict[tuple[str, int, int, int, torch.dtype, int], GemvConfig]:
    """The fused variants' configs chosen so far, keyed by (variant, *tuned_configs' key)."""
    return {key: config for key, config in _tuned.items() if key[0]}


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: GemvConfig | None = None, act: str | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= 16: weight [N, K], bias [N] -> [M, N].

    bf16, fp16 or fp32 (x, weight and bias of one dtype), fp32 accumulation, the output in that
    dtype. The weight's rows must be contiguous. `config` overrides the tuned choice (tests,
    benchmarks).

    With `act` ("silu" or "gelu_tanh"), x is a gated input [M, 2K] = [gate | up] (a merged
    gate_up projection's output) and the result is F.linear(act(gate) * up, weight, bias), the
    gated product rounded to x's dtype as the unfused SiluAndMul / GELU kernels round it: the
    activation kernel and its round trip through memory are folded into this one.
    """
    if act is not None and act not in GATED_ACTS:
        raise ValueError(f"skinny_linear act must be one of {sorted(GATED_ACTS)}, got {act!r}")
    x_cols = (2 if act is not None else 1) * weight.shape[-1]  # a gated x holds [gate | up]
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != x_cols:
        raise ValueError(f"skinny_linear needs x [M, K] (gated: [M, 2K]) and weight [N, K], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    m = x.shape[0]
    if m > MAX_M:
        raise ValueError(f"skinny_linear serves at most {MAX_M} rows, got {m}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"skinny_linear needs x, weight and bias of one dtype in {SUPPORTED_DTYPES}")
    if weight.stride(1) != 1 or weight.stride(0) != weight.shape[1]:
        raise ValueError("skinny_linear needs a contiguous weight")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        config = get_config(x, weight, bias, out, act)
    return _launch(x, weight, bias, out, config, act)
