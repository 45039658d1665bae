"""Mid-sized GEMM: y[M, N] = x[M, K] @ W[N, K]^T + b for 16 < M <= 256 tokens (large-batch decode).

At decode batch 256 of a small model (Qwen3-0.6B: N, K of 1024-6144) cuBLAS runs at about a
third of tensor-core peak on an H200: its 128x128 tiles make e.g. 2 x 8 = 16 programs for
y[256, 1024] = x[256, 2048] @ W^T on 132 SMs. This kernel is a plain tiled GEMM whose launch
configuration is chosen per shape to fill the SMs instead:

- Program (tile, k-split) owns a BLOCK_M x BLOCK_N output tile and walks K / SPLIT_K of it in
  BLOCK_K steps (loads pipelined over num_stages). Smaller tiles and split-K multiply the
  programs; `candidate_configs` lists the ones worth timing for a shape.
- Tiles are ordered M-fastest (or in GROUP_M bands): the programs of one weight column block run
  together, so each weight byte leaves DRAM about once while x (<= 1.5 MB) stays in L2.
- Split-K writes fp32 partials [SPLIT_K, M, N] that a second kernel (triton_gemv's) sums in a
  fixed order: no atomics, bitwise reproducible results.

M and x's row stride are `do_not_specialize` (a new batch size never recompiles); N and K are
fixed per layer. No host syncs: every launch is CUDA-graph capturable. Accumulation is fp32;
the output has x's dtype. Not wired into the linear layers yet: `mid_gemm` takes an explicit
config (or the heuristic one) so a benchmark can compare candidates with cuBLAS first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.layers.triton_gemv import _split_k_reduce_kernel, load_weight_tile, num_sms

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SMEM_LIMIT = 227 * 1024  # dynamic shared memory per block on H100 / H200 (sm_90)
_REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the mid-sized GEMM.

    group_m None orders tiles M-fastest; an int orders them in bands of group_m row blocks
    (the classic L2 swizzle, which matters only when x is large).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        group = f" g{self.group_m}" if self.group_m else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} sk{self.split_k}{group} "
                f"w{self.num_warps} s{self.num_stages}")

    def smem_bytes(self, elem: int) -> int:
        """Shared memory of the pipelined x and weight tiles for elements of `elem` bytes."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * elem


@triton.jit(do_not_specialize=["M", "stride_xm"])
def _mid_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, stride_xm, N, K,
    X_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Program (tile, k-split): out[m-block, n-block] (+ bias), or its fp32 partial when split."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    if GROUP_M == 0:
        pid_m = pid % num_pid_m
        pid_n = pid // num_pid_m
    else:
        width = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // width) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_size
        pid_n = (pid % width) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Rows past M re-read valid rows (wrapped) instead of masking: x loads stay unmasked along M,
    # and those rows are never stored. The hint (X_ALIGN is 1 unless the wrapper proved it) keeps
    # 16-byte loads of x rows although the stride is not specialised.
    x_rows = tl.multiple_of((offs_m % M).to(tl.int64) * stride_xm, X_ALIGN)
    # Splits start on BLOCK_K boundaries, so only the tile holding K (when K % BLOCK_K != 0) is
    # partial; a split past K runs no tiles and writes a zero partial.
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    num_tiles = tl.cdiv(tl.minimum(K - k_lo, k_per_split), BLOCK_K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :]
    # 64-bit weight row offsets: N * K can pass 2^31 elements for an LM head.
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, num_tiles):
        k_ok = offs_k + i * BLOCK_K < K
        if EVEN_K:
            xt = tl.load(x_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
        if DOT_UPCAST:  # the interpreter cannot multiply 16-bit tiles: do it in fp32 there
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        dst = out_ptr
    else:  # the fp32 partial of split pid_k, in a workspace [SPLIT_K, M, N]
        dst = out_ptr + pid_k.to(tl.int64) * M * N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = dst + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(dst.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _split_for(tiles: int, k_tiles: int, sms: int) -> int:
    """Power-of-two K split (<= 8) that brings the grid to ~80% of a wave, each split >= 2 K tiles.

    Every split adds a round trip of M x N fp32 partials and a reduce launch (a few us at these
    sizes), so a grid that already fills most SMs is not split.
    """
    split = 1
    while tiles * split < 0.8 * sms and split < 8 and k_tiles // (split * 2) >= 2:
        split *= 2
    return split


def candidate_configs(n: int, k: int, m: int, dtype: torch.dtype, num_sms: int) -> list[GemmConfig]:
    """The launch configurations worth timing for y[m, n] = x[m, k] @ W[n, k]^T (about 6-12).

    Tiles: BLOCK_M is the power of two covering m (16..128) and half of it (two row blocks of
    half the height can beat one tall one when they double the programs), times BLOCK_N 32, 64
    and 128. Small tiles (<= 64 x 64) step 128 deep in K to keep enough bytes in flight per
    program; larger ones 64 deep (128-byte bf16 rows, one swizzle line) to bound shared memory.
    8 warps (two warpgroups) only for 128 x 128. 4 stages while a stage is <= 24 KB, else 3.
    Tile counts of more than 4 waves are dropped (a larger tile does the same work with fewer
    re-reads of x), except for the largest tile, so the list is never empty. Split-K: the fill
    rule of `_split_for`, plus half of it (or 2 when that rule says 1 yet the grid is under 1.5
    waves) since the reduce pass may cost more than idle SMs.
    Sorted by a rough cost model (`_estimate_us`): the first entry is the heuristic pick.
    """
    elem = 4 if dtype == torch.float32 else 2
    bm_full = min(128, max(16, _next_pow2(m)))
    block_ms = [bm_full] + ([bm_full // 2] if bm_full > 16 else [])
    m_blocks = {bm: triton.cdiv(m, bm) for bm in block_ms}
    configs: list[GemmConfig] = []
    for bm in block_ms:
        for bn in (128, 64, 32):
            tiles = m_blocks[bm] * triton.cdiv(n, bn)
            if tiles > 4 * num_sms and (bm, bn) != (bm_full, 128):  # the largest tile always stays
                continue
            bk = 128 if bm * bn <= 64 * 64 else 64
            warps = 8 if bm * bn >= 128 * 128 else 4
            stages = 4 if (bm + bn) * bk * elem <= 24 * 1024 else 3
            k_tiles = triton.cdiv(k, bk)
            split = _split_for(tiles, k_tiles, num_sms)
            alt = split // 2 if split > 1 else (2 if tiles < 1.5 * num_sms and k_tiles >= 4 else 0)
            for s in (split, alt):
                if s:
                    configs.append(GemmConfig(bm, bn, bk, s, None, warps, stages))
    configs = [c for c in dict.fromkeys(configs) if c.smem_bytes(elem) <= SMEM_LIMIT]
    return sorted(configs, key=lambda c: _estimate_us(c, n, k, m, num_sms))


# A rough cost model, used only to order the candidates (the first is the untimed default):
# sm_90 dense bf16 does ~3.75e6 MACs per us per SM; each element a program loads is charged
# _LOAD_MACS MACs (small tiles are load-bound); split-K adds a reduce launch and a write + read
# of the fp32 partials, which mostly stay in L2 (~8 MB/us).
_MACS_PER_US = 3.75e6
_LOAD_MACS = 32
_REDUCE_US = 1.5
_PARTIAL_BYTES_PER_US = 8e6


def _estimate_us(c: GemmConfig, n: int, k: int, m: int, sms: int) -> float:
    """Modelled microseconds of config `c`: whole waves of equal programs, plus the reduce."""
    programs = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) * c.split_k
    k_per_split = triton.cdiv(k, c.split_k * c.block_k) * c.block_k
    per_program = k_per_split * (c.block_m * c.block_n + _LOAD_MACS * (c.block_m + c.block_n)) / _MACS_PER_US
    reduce = 0.0 if c.split_k == 1 else _REDUCE_US + 2 * m * n * c.split_k * 4 / _PARTIAL_BYTES_PER_US
    return triton.cdiv(programs, sms) * per_program + reduce


def heuristic_config(n: int, k: int, m: int, dtype: torch.dtype, num_sms: int) -> GemmConfig:
    """The untimed choice: the first of `candidate_configs`."""
    return candidate_configs(n, k, m, dtype, num_sms)[0]


def mid_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K], weight [N, K], bias [N] -> [M, N] (into `out` if given).

    bf16, fp16 or fp32 (x, weight and bias of one dtype), fp32 accumulation, output in that
    dtype (fp32 multiplies in IEEE fp32, not TF32). The weight must be contiguous; `out`, if
    given, a contiguous [M, N] tensor of x's dtype. `config` defaults to the heuristic pick.
    Built for 16 < M <= 256 but correct for any M.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"mid_gemm needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"mid_gemm needs x, weight and bias of one dtype in {SUPPORTED_DTYPES}")
    if not weight.is_contiguous():
        raise ValueError("mid_gemm needs a contiguous weight")
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"mid_gemm needs out as a contiguous [{m}, {n}] {x.dtype} tensor")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        config = heuristic_config(n, k, m, x.dtype, num_sms(x.device))
    elem = x.element_size()
    split = config.split_k
    # Partials of the splits, summed in order by the reduce kernel (allocated per call: under a
    # CUDA graph it comes from the graph's pool).
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else weight  # any pointer: HAS_BIAS is off
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split)
    _mid_gemm_kernel[grid](
        x, weight, bias_arg, target,
        m, x.stride(0), n, k,
        X_ALIGN=16 // elem if x.stride(0) % (16 // elem) == 0 else 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=split, GROUP_M=config.group_m or 0,
        EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
        HAS_BIAS=bias is not None and split == 1,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",  # (ignored for 16-bit inputs)
        DOT_UPCAST=_interpreting() and x.dtype != torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split > 1:
        total = m * n
        _split_k_reduce_kernel[(triton.cdiv(total, _REDUCE_BLOCK),)](
            target, bias_arg, out, total, n,
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, num_warps=4,
        )
    return out
