"""Programmatic dependent launch (PDL) after latency-bound kernels (Hopper and later).

At decode batch sizes a layer alternates weight streams (the GEMMs) with kernels that move
almost no bytes and leave most SMs idle: the decode attention and its split reduce before the O
projection, and at TP > 1 the all-reduces before the add + RMSNorm GEMMs. Such a kernel calls
`trigger_dependents` as it starts, and the GEMM after it is launched with PDL: its programs
become resident while the small kernel still runs, prefetch the first columns of their weight
rows into L2 (the weights do not depend on the predecessor), then wait at `gdc_wait` for the
predecessor to complete and its writes to be visible, and only then read the activations. The
GEMM's launch and first DRAM round trip hide behind the small kernel.

GEMMs never trigger their own successors early: GEMM-to-GEMM overlap was measured slower (the
fifth session's `pdl_h200_*.json`: two weight streams competing). A PDL launch whose
predecessor does not trigger simply starts when the predecessor ends, as without PDL.

Correctness rests on one rule: nothing before `gdc_wait` reads what an earlier kernel wrote.
Off under the interpreter and before sm_90; `PAGEDLLM_DISABLE_PDL=1` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

DISABLE_ENV = "PAGEDLLM_DISABLE_PDL"
_PREFETCH_K: tl.constexpr = tl.constexpr(1024)  # columns per weight row prefetched before the wait (16 lines of bf16)


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` use PDL: CUDA sm_90+, not interpreting, not disabled."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false"):
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@triton.jit
def prefetch_then_wait(w_ptr, offs_n, N, K, k_lo, PDL: tl.constexpr):
    """With PDL: prefetch the first columns of this program's weight rows into L2, then wait for
    the predecessor kernel (complete, its writes visible). Without: nothing."""
    if PDL:
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        cols = tl.minimum(k_lo + tl.arange(0, _PREFETCH_K // 64) * 64, K - 1)
        ptrs = w_ptr + rows[:, None] * K + cols[None, :]
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
        gdc_wait()


@triton.jit
def trigger_dependents(PDL: tl.constexpr):
    """In a latency-bound kernel: let a PDL-launched successor start now (no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()
