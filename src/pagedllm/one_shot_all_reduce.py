"""One-shot all-reduce of small 16-bit tensors through peer-mapped memory, as one Triton kernel.

A decode step at batch 1 all-reduces a few KB per call, 64 times per step at TP=2 on an 8B
model: the cost is latency, not bandwidth. torch's two-shot kernel plus the copies into and out
of its symmetric buffer took ~12 us per call on H100s. Here one kernel does the whole call, in
the "LL" (low-latency) style of NCCL's small-message protocol:

1. every program packs its chunks of x into 8-byte words, each two 16-bit elements plus the
   call's epoch, and stores them into each peer's buffer, in the region for this rank in the
   slot of the epoch's parity (stores over NVLink are posted: no round trip);
2. it polls its own buffer (volatile loads) until every word of its chunks from every peer
   carries the epoch: an aligned 8-byte store is seen whole or not at all, so a word with the
   epoch holds its data, and no fence or separate flag (an atomic with a round trip) is needed;
3. it sums x and the peers' data in rank order, in fp32, so every rank gets the same bits, and
   writes the result over x.

Slots alternate with the parity of the epoch: a rank writes into a peer's slot again two calls
later, and by then it has seen that peer's words of the call in between, which the peer pushes
only after it finished reading the slot (its kernels run in stream order). A reader zeroes the
words it consumed, so a slot never holds a word of an earlier call (a later call may be larger
than the last one that wrote a word), and epochs can run in a finite cycle (1 .. 2^30) without
ever being mistaken. Chunk c is always handled by program c % MAX_PROGRAMS, on every rank and
at every size, and each program keeps its own epoch counter in device memory, so the kernel
needs no host state and replays from a CUDA graph.

Every program waits only for the same program on the peers; the grid is small enough that all
programs are resident at once on every rank, so none waits on one that cannot run. (An earlier
version sent a release flag per program after the data: 4.5 us per call against 3.1 for this
one, at its first chunk size, on H200s; docs/benchmarks.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Swept on 2 x H200 (docs/benchmarks.md, seventh session): 256-word chunks, 8 warps and up to 128
# programs took a batch-1 all-reduce (4096 elements) from 3.19 to 2.57 us and a 16-token one from
# 3.99 to 3.34 against 1024-word chunks, 4 warps and 32 programs. 128 programs of 8 warps and a
# few KB of shared memory are resident at once on any GPU with NVLink peers (several fit on one
# SM), so none waits on a peer program that cannot run. Every rank must use the same values.
MAX_PROGRAMS = 128
_BLOCK = 256  # words per chunk: 512 elements
_NUM_WARPS = 8
EPOCH_PERIOD: tl.constexpr = tl.constexpr(1 << 30)  # epochs run 1 .. 2^30 and start over (an even period)


@triton.jit
def _halves_to_float(words, elem: tl.constexpr):
    """The two 16-bit elements of each int32 word (low half first), as fp32."""
    lo = (words & 0xFFFF).to(tl.uint16).to(elem, bitcast=True).to(tl.float32)
    hi = ((words >> 16) & 0xFFFF).to(tl.uint16).to(elem, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _local_words(x_ptr, ids_ptr, table_ptr, offs, mask, vocab_start, table_rows, row_words, GATHER: tl.constexpr):
    """This rank's int32 words at `offs`: x's; or, with GATHER, those of the embedding rows of
    the tokens at ids_ptr that fall in this rank's slice of the vocabulary (table rows
    vocab_start .. vocab_start + table_rows), zeros for the tokens of other slices."""
    if GATHER:
        local = tl.load(ids_ptr + offs // row_words, mask=mask, other=-1) - vocab_start
        mine = mask & (local >= 0) & (local < table_rows)
        return tl.load(table_ptr + local * row_words + offs % row_words, mask=mine, other=0)
    else:
        return tl.load(x_ptr + offs, mask=mask, other=0)


@triton.jit(do_not_specialize=["n_words", "slot_words", "vocab_start", "table_rows", "row_words"])
def _one_shot_all_reduce_kernel(
    x_ptr, buffer_ptrs, epoch_ptr, n_words, slot_words,
    ids_ptr, table_ptr, vocab_start, table_rows, row_words,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, ELEM: tl.constexpr, GATHER: tl.constexpr,
):
    """Program pid: push its chunks of x (int32 words of two elements; with GATHER, of this
    rank's embedding lookup instead) to every peer, tagged with the epoch; wait for every peer's;
    write the rank-ordered sums over x."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(epoch_ptr + pid) % EPOCH_PERIOD + 1  # 1 .. EPOCH_PERIOD: never 0, never overflows
    tag = epoch.to(tl.int64) << 32
    slot = (epoch & 1).to(tl.int64) * WORLD * slot_words
    for start in range(pid * BLOCK, n_words, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_words
        words = _local_words(x_ptr, ids_ptr, table_ptr, offs, mask, vocab_start, table_rows, row_words, GATHER)
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
                words = _local_words(x_ptr, ids_ptr, table_ptr, offs, mask, vocab_start, table_rows, row_words,
                                     GATHER)
            else:
                ptrs = own + r * slot_words + offs
                got = tl.load(ptrs, mask=mask, other=tag, volatile=True)
                while tl.sum(((got >> 32) != epoch).to(tl.int32), axis=0) > 0:
                    got = tl.load(ptrs, mask=mask, other=tag, volatile=True)
                tl.store(ptrs, tl.zeros([BLOCK], dtype=tl.int64), mask=mask)  # consumed: no stale tag left
                words = (got & 0xFFFFFFFF).to(tl.int32)
            lo, hi = _halves_to_float(words, ELEM)
            acc_lo += lo
            acc_hi += hi
        lo_bits = acc_lo.to(ELEM).to(tl.uint16, bitcast=True).to(tl.int32)
        hi_bits = acc_hi.to(ELEM).to(tl.uint16, bitcast=True).to(tl.int32)
        tl.store(x_ptr + offs, lo_bits | (hi_bits << 16), mask=mask)
    tl.store(epoch_ptr + pid, epoch)


def num_programs(numel: int) -> int:
    """Programs the kernel runs for `numel` 16-bit elements (every rank agrees: numel only)."""
    return max(1, min(MAX_PROGRAMS, triton.cdiv(numel // 2, _BLOCK)))


def one_shot_all_reduce_(x: torch.Tensor, buffer_ptrs: torch.Tensor, epochs: torch.Tensor, slot_words: int,
                         rank: int, world_size: int) -> torch.Tensor:
    """Sum the contiguous 16-bit tensor `x` (even numel, 4-byte aligned) over the ranks in place.

    buffer_ptrs: int64 [world_size] device tensor with the address of each rank's int64 buffer
    (2 x world_size x slot_words words, zeroed before first use), peer-mapped on this device;
    epochs: this rank's int32 [MAX_PROGRAMS] counters, zeroed. Every rank must make the same calls.
    """
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the one-shot all-reduce takes 16-bit tensors, got {x.dtype}")
    if not x.is_contiguous() or x.numel() % 2 or x.data_ptr() % 4:
        raise ValueError("the one-shot all-reduce needs a contiguous, 4-byte aligned tensor of even numel")
    if x.numel() // 2 > slot_words:
        raise ValueError(f"{x.numel()} elements do not fit the {slot_words}-word buffer slot")
    if x.numel() == 0:
        return x
    words = x.view(torch.int32)
    _one_shot_all_reduce_kernel[(num_programs(x.numel()),)](
        words, buffer_ptrs, epochs, x.numel() // 2, slot_words, words, words, 0, 0, 1,
        RANK=rank, WORLD=world_size, BLOCK=_BLOCK, ELEM=_elem(x.dtype), GATHER=False, num_warps=_NUM_WARPS,
    )
    return x


def one_shot_embedding_all_reduce(input_ids: torch.Tensor, table: torch.Tensor, vocab_start: int,
                                  buffer_ptrs: torch.Tensor, epochs: torch.Tensor, slot_words: int, rank: int,
                                  world_size: int) -> torch.Tensor:
    """A vocabulary-parallel embedding lookup and its all-reduce in one launch: [T, hidden].

    Each rank looks up the tokens of `input_ids` [T] that fall in its slice of the vocabulary
    (`table` [rows, hidden], 16-bit, holds tokens vocab_start .. vocab_start + rows), zeros for
    the others, and the ranks' lookups are summed as `one_shot_all_reduce_` sums (one nonzero
    term per element: the whole table's rows, bit for bit). At batch 1 this is one kernel where
    the lookup, its masks and the all-reduce took eight. Every rank must make the same calls.
    """
    if table.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the one-shot all-reduce takes 16-bit tensors, got {table.dtype}")
    hidden = table.shape[1]
    if not table.is_contiguous() or hidden % 2 or table.data_ptr() % 4:
        raise ValueError("the one-shot embedding needs a contiguous, 4-byte aligned table with an even row size")
    out = torch.empty(input_ids.numel(), hidden, dtype=table.dtype, device=table.device)
    if out.numel() // 2 > slot_words:
        raise ValueError(f"{out.numel()} elements do not fit the {slot_words}-word buffer slot")
    if out.numel() == 0:
        return out
    _one_shot_all_reduce_kernel[(num_programs(out.numel()),)](
        out.view(torch.int32), buffer_ptrs, epochs, out.numel() // 2, slot_words,
        input_ids.reshape(-1), table.view(torch.int32), vocab_start, table.shape[0], hidden // 2,
        RANK=rank, WORLD=world_size, BLOCK=_BLOCK, ELEM=_elem(table.dtype), GATHER=True, num_warps=_NUM_WARPS,
    )
    return out


def _elem(dtype: torch.dtype) -> tl.dtype:
    """The Triton type of a 16-bit torch dtype."""
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
