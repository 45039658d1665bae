"""Programmatic dependent launch (PDL) for the decode GEMMs (Hopper and later).

A decode step is ~10 kernels per layer, each a weight stream of a few to a few tens of
microseconds at TP=2. Between two kernels the GPU drains the first, launches the second and
waits a DRAM latency for its first weight tiles: a ramp that costs the same at every size, so
the half-size GEMMs of TP=2 pay it twice as often per byte. With PDL a kernel may launch while
its predecessor is finishing: its programs first prefetch the start of their weight slab into
L2 (the weights do not depend on the predecessor), then wait at `gdc_wait` for the predecessor
to complete and its writes to be visible, and only then read the activations. Each such kernel
also lets its own successor launch early (`gdc_launch_dependents`).

Correctness rests on one rule: nothing before `gdc_wait` reads what an earlier kernel wrote.
Off under the interpreter and before sm_90; `PAGEDLLM_DISABLE_PDL=1` turns it off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

DISABLE_ENV = "PAGEDLLM_DISABLE_PDL"
_PREFETCH_K: tl.constexpr = tl.constexpr(1024)  # columns per weight row prefetched before the wait (16 lines of bf16)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA sm_90+, not interpreting, not disabled."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def prefetch_then_wait(w_ptr, offs_n, N, K, k_lo, PDL: tl.constexpr):
    """With PDL: prefetch the first columns of this program's weight rows into L2, wait for the
    predecessor kernel, and let the successor launch. Without: nothing."""
    if PDL:
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        cols = tl.minimum(k_lo + tl.arange(0, _PREFETCH_K // 64) * 64, K - 1)
        ptrs = w_ptr + rows[:, None] * K + cols[None, :]
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
        gdc_wait()
        gdc_launch_dependents()
