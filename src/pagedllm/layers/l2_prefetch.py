"""Prefetch a weight into the GPU's L2 while memory bandwidth would otherwise sit idle (sm_90+).

A batch-1 decode step alternates weight streams (the linear layers, bandwidth-bound) with
latency-bound work that moves almost no bytes (attention over a few hundred keys, the
all-reduces). A linear layer whose weight fits in L2 (the O projection: 32 MB for
Llama-3.1-8B, 16 MB per rank at TP=2; an H100/H200 has 50 MB of L2) can have its weight
fetched during that idle time: `l2_prefetch` issues `cp.async.bulk.prefetch.L2` for the whole
tensor from a few programs and returns at once (the copies complete asynchronously and never
change memory: a pure performance hint). Launched on a side stream, it overlaps the attention
kernels; the GEMM then reads from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 16384  # bytes per prefetch instruction (a multiple of 16)
_THREADS = 32  # chunks issued per program: one warp, so the prefetches spread over many SMs


@triton.jit
def _l2_prefetch_kernel(base_ptr, num_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program p: prefetch chunks [p * BLOCK, (p + 1) * BLOCK) of CHUNK bytes (the last one short)."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    size = tl.minimum(num_bytes - offs, CHUNK).to(tl.int32)
    size = tl.where(size > 0, size, 0)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r", [base_ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_load_kernel(base_ptr, sink_ptr, num_words, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Program p reads words [p * TILES * BLOCK, ...) with an evict-last hint. The values feed
    only a store whose mask depends on them (in practice never taken), so the loads are kept."""
    start = tl.program_id(0).to(tl.int64) * TILES * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for t in tl.range(0, TILES, num_stages=4):
        offs = start + t * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(base_ptr + offs, mask=offs < num_words, other=0, eviction_policy="evict_last")
    total = tl.sum(acc, axis=0)
    tl.store(sink_ptr, total, mask=total == 0x5A5A5A5A)


_sinks: dict[int, torch.Tensor] = {}


def l2_load(tensor: torch.Tensor, programs: int = 32) -> None:
    """`l2_prefetch` by plain loads from `programs` programs (for comparison in benchmarks)."""
    words = tensor.view(-1).view(torch.int32)
    block = 2048
    tiles = triton.cdiv(triton.cdiv(words.numel(), block), programs)
    sink = _sinks.setdefault(tensor.device.index or 0, torch.zeros(1, dtype=torch.int32, device=tensor.device))
    _l2_load_kernel[(triton.cdiv(words.numel(), block * tiles),)](words, sink, words.numel(), BLOCK=block,
                                                                   TILES=tiles, num_warps=8)


def supported(tensor: torch.Tensor) -> bool:
    """Whether `l2_prefetch` can run for this tensor: contiguous, 16-byte aligned, on an sm_90+ GPU."""
    return (tensor.is_cuda and tensor.is_contiguous() and tensor.data_ptr() % 16 == 0
            and (tensor.numel() * tensor.element_size()) % 16 == 0
            and torch.cuda.get_device_capability(tensor.device)[0] >= 9)


def l2_prefetch(tensor: torch.Tensor) -> None:
    """Ask the GPU to bring `tensor`'s bytes into L2 (asynchronous; no effect on any value).

    Only for tensors `supported` accepts. CUDA-graph capturable.
    """
    num_bytes = tensor.numel() * tensor.element_size()
    if num_bytes == 0:
        return
    num_chunks = triton.cdiv(num_bytes, CHUNK_BYTES)
    _l2_prefetch_kernel[(triton.cdiv(num_chunks, _THREADS),)](
        tensor.view(-1).view(torch.uint8), num_bytes, CHUNK=CHUNK_BYTES, BLOCK=_THREADS, num_warps=1)
