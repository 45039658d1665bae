"""One-shot all-reduce of small tensors through peer-mapped memory, as one Triton kernel.

A decode step at batch 1 all-reduces a few KB per call, 64 times per step at TP=2 on an 8B
model: the cost is latency, not bandwidth. torch's two-shot kernel plus the copies into and out
of its symmetric buffer took ~12 us per call on H100s. Here one kernel does the whole call:

1. every program pushes its chunks of x into each peer's buffer, in the region for this rank in
   the slot of this call's parity (stores over NVLink are posted: no round trip);
2. it publishes the call's epoch into each peer's flag for (this rank, this program), with
   release semantics at system scope, after a CTA barrier (so all its threads' stores are seen);
3. it spins until every peer's flag for (that peer, this program) reaches the epoch (acquire);
4. it sums x and the peers' regions of its own buffer (local reads) in rank order, so every
   rank gets the same bits, in fp32, and writes the result over x.

Slots alternate with the parity of the epoch: a rank writes into a peer's slot again two calls
later, and by then it has seen that peer's flag of the call in between, which the peer
publishes only after it finished reading the slot (its kernels run in stream order). A flag
that is already one epoch ahead is as good as the awaited one. Each program keeps its own epoch
counter in device memory, so the kernel needs no host state and replays from a CUDA graph.

Every program waits only for the same program on the peers; the grid stays far below the SM
count so that all programs are resident at once on every rank and none waits on one that
cannot run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 32
_BLOCK = 2048  # elements per chunk: 4 KB of bf16


@triton.jit
def _wait_for_epoch(flag_ptr, epoch):
    """Spin until the flag holds `epoch` or `epoch + 1` (acquire, system scope)."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    while (seen != epoch) & (seen != epoch + 1):
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")


@triton.jit(do_not_specialize=["n", "slot_numel"])
def _one_shot_all_reduce_kernel(
    x_ptr, buffer_ptrs, flag_ptrs, epoch_ptr, n, slot_numel,
    RANK: tl.constexpr, WORLD: tl.constexpr, MAX_PROGS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    elem = x_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr + pid) + 1
    # A buffer is [2 slots][WORLD regions][slot_numel]: region r of a slot holds rank r's data.
    slot = (epoch % 2).to(tl.int64) * WORLD * slot_numel
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                region = tl.load(buffer_ptrs + peer).to(tl.pointer_type(elem)) + slot + RANK * slot_numel
                tl.store(region + offs, x, mask=mask)
    tl.debug_barrier()
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + RANK * MAX_PROGS + pid, epoch, sem="release", scope="sys")
    own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            _wait_for_epoch(own_flags + peer * MAX_PROGS + pid, epoch)
    tl.debug_barrier()
    own = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(elem)) + slot
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                acc += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                acc += tl.load(own + r * slot_numel + offs, mask=mask, other=0.0,
                               cache_modifier=".cv").to(tl.float32)
        tl.store(x_ptr + offs, acc.to(elem), mask=mask)
    tl.store(epoch_ptr + pid, epoch)


def num_programs(numel: int) -> int:
    """Programs the kernel runs for `numel` elements (both ranks must agree: it depends on numel only)."""
    return max(1, min(MAX_PROGRAMS, triton.cdiv(numel, _BLOCK)))


def one_shot_all_reduce_(x: torch.Tensor, buffer_ptrs: torch.Tensor, flag_ptrs: torch.Tensor,
                         epochs: torch.Tensor, slot_numel: int, rank: int, world_size: int) -> torch.Tensor:
    """Sum the contiguous tensor `x` over the ranks in place.

    buffer_ptrs / flag_ptrs: int64 [world_size] device tensors with the address of each rank's
    data buffer (2 x world_size x slot_numel elements of x's dtype) and flag array (int32
    [world_size, MAX_PROGRAMS], zeroed before first use), peer-mapped on this device; epochs:
    this rank's int32 [MAX_PROGRAMS] counters, zeroed. Every rank must make the same calls.
    """
    if not x.is_contiguous():
        raise ValueError("one_shot_all_reduce_ needs a contiguous tensor")
    if x.numel() > slot_numel:
        raise ValueError(f"{x.numel()} elements do not fit the {slot_numel}-element buffer slot")
    if x.numel() == 0:
        return x
    grid = (num_programs(x.numel()),)
    _one_shot_all_reduce_kernel[grid](
        x, buffer_ptrs, flag_ptrs, epochs, x.numel(), slot_numel,
        RANK=rank, WORLD=world_size, MAX_PROGS=MAX_PROGRAMS, BLOCK=_BLOCK, num_warps=4,
    )
    return x


# --- The LL ("low latency") variant: the flag travels inside the data. -----------------------
#
# The kernel above orders data before flag with a release at system scope: each program waits
# for its NVLink stores to be acknowledged before the flag can go, and the flag is an atomic
# with a round trip. Here every 8-byte word pushed to a peer carries 4 bytes of x (two 16-bit
# elements) and the call's epoch in the other 4; an aligned 8-byte store is seen whole or not
# at all, so a reader that finds the epoch in a word has its data: no fence, no flag, no round
# trip. The reader polls its own buffer (volatile loads) until every word of its chunk carries
# the epoch. Buffers are int64 [2 slots][WORLD regions][slot_words]; slots alternate with the
# epoch's parity as above (a word of the slot's previous use carries epoch - 2, never epoch).


@triton.jit
def _halves_to_float(words, elem: tl.constexpr):
    """The two 16-bit elements of each int32 word (low half first), as fp32."""
    lo = (words & 0xFFFF).to(tl.uint16).to(elem, bitcast=True).to(tl.float32)
    hi = ((words >> 16) & 0xFFFF).to(tl.uint16).to(elem, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit(do_not_specialize=["n_words", "slot_words"])
def _ll_all_reduce_kernel(
    x_ptr, buffer_ptrs, epoch_ptr, n_words, slot_words,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, ELEM: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(epoch_ptr + pid) + 1
    tag = epoch.to(tl.int64) << 32
    slot = (epoch % 2).to(tl.int64) * WORLD * slot_words
    for start in range(pid * BLOCK, n_words, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_words
        words = tl.load(x_ptr + offs, mask=mask)
        packed = (words.to(tl.int64) & 0xFFFFFFFF) | tag
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                region = tl.load(buffer_ptrs + peer).to(tl.pointer_type(tl.int64)) + slot + RANK * slot_words
                tl.store(region + offs, packed, mask=mask)
    own = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(tl.int64)) + slot
    for start in range(pid * BLOCK, n_words, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_words
        acc_lo = tl.zeros([BLOCK], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                words = tl.load(x_ptr + offs, mask=mask, other=0)
            else:
                ptrs = own + r * slot_words + offs
                got = tl.load(ptrs, mask=mask, other=tag, volatile=True)
                while tl.sum(((got >> 32) != epoch).to(tl.int32), axis=0) > 0:
                    got = tl.load(ptrs, mask=mask, other=tag, volatile=True)
                words = (got & 0xFFFFFFFF).to(tl.int32)
            lo, hi = _halves_to_float(words, ELEM)
            acc_lo += lo
            acc_hi += hi
        lo_bits = acc_lo.to(ELEM).to(tl.uint16, bitcast=True).to(tl.int32)
        hi_bits = acc_hi.to(ELEM).to(tl.uint16, bitcast=True).to(tl.int32)
        tl.store(x_ptr + offs, lo_bits | (hi_bits << 16), mask=mask)
    tl.store(epoch_ptr + pid, epoch)


_LL_BLOCK = 1024  # words per chunk: 2048 elements


def ll_num_programs(numel: int) -> int:
    """Programs the LL kernel runs for `numel` 16-bit elements (every rank agrees: numel only)."""
    return max(1, min(MAX_PROGRAMS, triton.cdiv(numel // 2, _LL_BLOCK)))


def ll_all_reduce_(x: torch.Tensor, buffer_ptrs: torch.Tensor, epochs: torch.Tensor, slot_words: int,
                   rank: int, world_size: int) -> torch.Tensor:
    """Sum the contiguous 16-bit tensor `x` (even numel, 4-byte aligned) over the ranks in place.

    buffer_ptrs: int64 [world_size] device tensor with the address of each rank's int64 buffer
    (2 x world_size x slot_words words, zeroed before first use), peer-mapped on this device;
    epochs: this rank's int32 [MAX_PROGRAMS] counters, zeroed. Every rank must make the same calls.
    """
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the LL all-reduce takes 16-bit tensors, got {x.dtype}")
    if not x.is_contiguous() or x.numel() % 2 or x.data_ptr() % 4:
        raise ValueError("the LL all-reduce needs a contiguous, 4-byte aligned tensor of even numel")
    if x.numel() // 2 > slot_words:
        raise ValueError(f"{x.numel()} elements do not fit the {slot_words}-word buffer slot")
    if x.numel() == 0:
        return x
    elem = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
    _ll_all_reduce_kernel[(ll_num_programs(x.numel()),)](
        x.view(torch.int32), buffer_ptrs, epochs, x.numel() // 2, slot_words,
        RANK=rank, WORLD=world_size, BLOCK=_LL_BLOCK, ELEM=elem, num_warps=4,
    )
    return x
