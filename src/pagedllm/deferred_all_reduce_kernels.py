"""Triton pieces of the deferred all-reduce (the protocol is described in deferred_all_reduce.py).

`push_region` / `push_end` are the producer's (the skinny GEMM's epilogue), `gathered_slot` /
`load_summed` the consumer's (the add + RMSNorm GEMM's prologue and loads),
`finish_` the stand-alone consumer that writes the sum out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from pagedllm.custom_all_reduce import SymmMemAllReduce

_FINISH_BLOCK = 2048


@triton.jit
def push_region(push_ptrs, rank, epoch, slot_numel, RANK: tl.constexpr, WORLD: tl.constexpr, elem: tl.constexpr):
    """Where this rank's [M, N] block goes in rank `rank`'s buffer for this call's parity."""
    base = tl.load(push_ptrs + rank).to(tl.pointer_type(elem))
    return base + ((epoch % 2).to(tl.int64) * WORLD + RANK) * slot_numel


@triton.jit
def push_end(arrival_ptrs, state_ptr, epoch, count, total, RANK: tl.constexpr, WORLD: tl.constexpr):
    """A producer program's end, after its block's stores: announce `count` elements to every
    peer and take a ticket. The last program waits until every peer announced all `total`
    elements (then zeroes those counters for the call after next) and bumps the epoch."""
    tl.debug_barrier()  # every thread's stores precede the release below
    parity = epoch % 2
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_counts = tl.load(arrival_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_add(peer_counts + RANK * 2 + parity, count, sem="release", scope="sys")
    ticket = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        own = tl.load(arrival_ptrs + RANK).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                seen = tl.atomic_add(own + peer * 2 + parity, 0, sem="acquire", scope="sys")
                while seen != total:
                    seen = tl.atomic_add(own + peer * 2 + parity, 0, sem="acquire", scope="sys")
                tl.store(own + peer * 2 + parity, 0)
        tl.store(state_ptr, epoch + 1)
        tl.store(state_ptr + 1, 0)


@triton.jit
def gathered_slot(state_ptr, slot_numel, WORLD: tl.constexpr):
    """A consumer's offset of the last producer call's slot in its buffer (that producer
    bumped the epoch past its own, after all peers' blocks had arrived)."""
    parity = (tl.load(state_ptr) + 1) % 2
    return parity.to(tl.int64) * WORLD * slot_numel


@triton.jit
def load_summed(ptrs, mask, slot_numel, WORLD: tl.constexpr):
    """The rank-ordered fp32 sum of the WORLD regions at `ptrs` (region 0), rounded to their dtype.
    (.cg: from L2, where the peers' stores land, never from a stale L1 line.)"""
    acc = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    for r in tl.static_range(1, WORLD):
        acc += tl.load(ptrs + r * slot_numel, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return acc.to(ptrs.dtype.element_ty)


@triton.jit(do_not_specialize=["total", "slot_numel"])
def _finish_kernel(buffer_ptr, state_ptr, out_ptr, total, slot_numel, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """out.flat = the summed regions (where no consumer kernel folds the sum in)."""
    base = buffer_ptr + gathered_slot(state_ptr, slot_numel, WORLD)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    tl.store(out_ptr + offs, load_summed(base + offs, mask, slot_numel, WORLD), mask=mask)


def finish_(comm: SymmMemAllReduce, out: torch.Tensor) -> torch.Tensor:
    """Write the sum of the last deferred all-reduce ([M, N], out's numel) into `out`."""
    total = out.numel()
    _finish_kernel[(triton.cdiv(total, _FINISH_BLOCK),)](
        comm.push_data, comm.push_state, out, total, comm.slot_numel,
        WORLD=comm.world_size, BLOCK=_FINISH_BLOCK, num_warps=4,
    )
    return out
