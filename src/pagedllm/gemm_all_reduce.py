"""The all-reduce of a row-parallel decode GEMM, done in the GEMM's own epilogue.

At TP=2 on an 8B model a decode step runs 64 all-reduces of a [batch, hidden] block each. The
one-shot kernel (`one_shot_all_reduce.py`) takes ~5 us per call on H100s / H200s, and most of
that is being a kernel of its own (a graph node, its launch and ramp), not moving 8 KB. Here the
skinny GEMM (`layers/triton_gemv.py` with PUSH) does it:

1. each program stores its output block, rounded to the activation dtype, into this rank's
   region of every rank's buffer (the peers' over NVLink: posted stores, overlapped with the
   other programs' GEMM work), then adds the block's element count to every peer's arrival
   counter for this rank (release, system scope), then takes a ticket (a counter in device
   memory, acq_rel at GPU scope);
2. the program with the last ticket, which then knows every block of its own rank is stored,
   waits until every peer's counter holds the whole [M, N] (acquire), zeroes those counters, sums
   the ranks' regions in rank order in fp32, rounded once (the bits the one-shot kernel gives,
   on every rank), writes the sum to the output, and bumps the epoch.

Buffers and counters alternate between two parities by `epoch` (producer calls completed, in
device memory). A rank pushes into a peer's parity p again two calls later; before that, its
own call in between waited for that peer's blocks of that call, which the peer pushed only after
finishing the call that read parity p. Counters are zeroed by the one program that waited on
them; a peer adds to them again only two calls later, after seeing this rank's next call.

Only one program per call waits, after all programs of its rank have announced their blocks,
and only for programs of other GPUs that never wait on it: no deadlock whatever the grid. The
single summing program is why the fused path is kept to small blocks (`MAX_SUM_ELEMENTS`). No
host state: CUDA-graph replayable.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_SUM_ELEMENTS = 8192  # [M, N] blocks up to this size are summed by the GEMM's last program
_SUM_BLOCK: tl.constexpr = tl.constexpr(1024)


@triton.jit
def push_region(push_ptrs, rank, epoch, slot_numel, RANK: tl.constexpr, WORLD: tl.constexpr, elem: tl.constexpr):
    """Where this rank's [M, N] block goes in rank `rank`'s buffer for this call's parity."""
    base = tl.load(push_ptrs + rank).to(tl.pointer_type(elem))
    # slot_numel is a multiple of 16 (specialised): the hint keeps the stores vectorised.
    return base + tl.multiple_of(((epoch % 2).to(tl.int64) * WORLD + RANK) * slot_numel, 16)


@triton.jit
def push_end(push_ptrs, arrival_ptrs, state_ptr, out_ptr, epoch, count, total, slot_numel,
             RANK: tl.constexpr, WORLD: tl.constexpr):
    """A program's end, after its block's stores (steps 1 and 2 of the module docstring)."""
    tl.debug_barrier()  # every thread's stores precede the release below
    parity = epoch % 2
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_counts = tl.load(arrival_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_add(peer_counts + RANK * 2 + parity, count, sem="release", scope="sys")
    ticket = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        own_counts = tl.load(arrival_ptrs + RANK).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                seen = tl.atomic_add(own_counts + peer * 2 + parity, 0, sem="acquire", scope="sys")
                while seen != total:
                    seen = tl.atomic_add(own_counts + peer * 2 + parity, 0, sem="acquire", scope="sys")
                tl.store(own_counts + peer * 2 + parity, 0)
        slot = push_region(push_ptrs, RANK, epoch, slot_numel, 0, WORLD, out_ptr.dtype.element_ty)
        for start in range(0, total, _SUM_BLOCK):
            offs = start + tl.arange(0, _SUM_BLOCK)
            mask = offs < total
            # .cg: from L2, where the peers' and the other programs' stores are, never a stale L1 line.
            acc = tl.load(slot + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            for r in tl.static_range(1, WORLD):
                acc += tl.load(slot + r * slot_numel + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(state_ptr, epoch + 1)
        tl.store(state_ptr + 1, 0)
