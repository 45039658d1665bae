"""Sharded sampling's partial winners, exchanged between the ranks and reduced in one kernel.

With tensor parallelism a greedy or temperature-only row is sampled from the ranks' slices of
the logits (worker/sharded_sampling.py): each rank finds the winner (key, token id) of every
chunk of its slice, and every rank must reduce all ranks' partials to the same token. Through
NCCL that was an all-gather with the copies and reshapes around it, eight launches and ~20 us
of a batch-1 decode step on two H200s, where one GPU's sampling is two launches. Here one kernel
does the exchange and the reduce, in the one-shot style of one_shot_all_reduce.py:

1. row r's program packs this rank's partials of the row into 8-byte words, each a 32-bit key or
   id plus the call's epoch, and stores them into every peer's buffer, in this rank's region of
   the slot of the epoch's parity, in the row's fixed span (an aligned 8-byte store lands whole,
   so a word with the epoch holds its data: no fence, no flag);
2. it polls its own buffer until every peer's words of the row carry the epoch, and zeroes them;
3. it reduces rank by rank: the largest key, the smallest token id among ties (the ranks' slices
   are increasing token ranges, so a tie keeps the earlier rank), as `_race_reduce_kernel` does
   over the gathered partials: every rank gets the same tokens.

Row r is always handled by program r % MAX_PROGRAMS and its words always lie in row r's span of a
slot, so only that program ever touches them, on every rank. The slot argument of
one_shot_all_reduce.py then holds per program: a rank writes into a peer's slot again two of the
program's calls later, after it has seen the peer's words of the call in between, which the peer
pushed only after it had finished reading the slot. The buffer and the epoch counters are this
exchange's own (not shared with the all-reduce, whose programs map words differently).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.one_shot_all_reduce import EPOCH_PERIOD
from pagedllm.worker.sharded_sampling import Partials
# The unsplit reduce's rules: a row's first maximum, and a running winner that a later (larger)
# token id replaces only with a strictly larger key.
from pagedllm.worker.triton_sampling import _first_argmax, _keep_first_max

MAX_PROGRAMS = 128  # rows in flight at once; all resident, so no program waits on one that cannot run
# A row's span in a slot: up to 4 arrays (keys, ids, +inf keys, +inf ids) of up to 128 chunks.
ROW_WORDS = 512
MAX_ROWS = 256  # rows a call may exchange (batch sizes beyond go through NCCL)


@triton.jit
def _pack(values, tag):
    """32-bit values (fp32 or int32) as int64 words tagged with the epoch in the high half."""
    return (values.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | tag


@triton.jit(do_not_specialize=["n_rows", "n_chunks", "slot_words"])
def _exchange_reduce_kernel(
    keys_ptr, ids_ptr, inf_keys_ptr, inf_ids_ptr, out_ptr, buffer_ptrs, epoch_ptr,
    n_rows, n_chunks, slot_words,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK_C: tl.constexpr, HAS_INF: tl.constexpr,
    ROW_WORDS: tl.constexpr,
):
    """Program pid: rows pid, pid + num_programs, ...: push this rank's partials of the row, wait
    for every peer's, write the row's token (the +inf race first with HAS_INF, then the finite
    winner, then 0)."""
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr + pid) % EPOCH_PERIOD + 1  # 1 .. EPOCH_PERIOD: never 0
    tag = epoch.to(tl.int64) << 32
    slot = (epoch & 1).to(tl.int64) * WORLD * slot_words
    ARRAYS: tl.constexpr = 4 if HAS_INF else 2
    chunks = tl.arange(0, BLOCK_C)
    arrays = tl.arange(0, ARRAYS)
    mask = (chunks < n_chunks)[None, :] & (arrays < ARRAYS)[:, None]
    span = arrays[:, None] * n_chunks + chunks[None, :]  # [ARRAYS, BLOCK_C] words of a row's span
    own = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(tl.int64)) + slot
    for row in range(pid, n_rows, tl.num_programs(0)):
        src = row * n_chunks + chunks  # < MAX_ROWS x ROW_WORDS: int32 will do
        cmask = chunks < n_chunks
        keys = tl.load(keys_ptr + src, mask=cmask, other=float("-inf"))
        ids = tl.load(ids_ptr + src, mask=cmask, other=0)
        words = tl.where(arrays[:, None] == 0, _pack(keys, tag)[None, :], _pack(ids, tag)[None, :])
        if HAS_INF:
            inf_keys = tl.load(inf_keys_ptr + src, mask=cmask, other=float("-inf"))
            inf_ids = tl.load(inf_ids_ptr + src, mask=cmask, other=0)
            words = tl.where(arrays[:, None] == 2, _pack(inf_keys, tag)[None, :], words)
            words = tl.where(arrays[:, None] == 3, _pack(inf_ids, tag)[None, :], words)
        row_base = row * ROW_WORDS
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                region = tl.load(buffer_ptrs + peer).to(tl.pointer_type(tl.int64)) + slot + RANK * slot_words
                tl.store(region + row_base + span, words, mask=mask)
        best = float("-inf")
        best_id = 0
        inf_best = float("-inf")
        inf_best_id = 0
        for r in tl.static_range(WORLD):
            if r == RANK:
                got = words
            else:
                ptrs = own + r * slot_words + row_base + span
                got = tl.load(ptrs, mask=mask, other=tag, volatile=True)
                while tl.sum(tl.sum(((got >> 32) != epoch).to(tl.int32), axis=1), axis=0) > 0:
                    got = tl.load(ptrs, mask=mask, other=tag, volatile=True)
                tl.store(ptrs, tl.zeros([ARRAYS, BLOCK_C], dtype=tl.int64), mask=mask)  # consumed
            values = (got & 0xFFFFFFFF).to(tl.int32)
            r_keys = tl.sum(tl.where(arrays[:, None] == 0, values, 0), axis=0).to(tl.float32, bitcast=True)
            r_ids = tl.sum(tl.where(arrays[:, None] == 1, values, 0), axis=0)
            r_keys = tl.where(cmask, r_keys, float("-inf"))
            key, token = _first_argmax(r_keys, r_ids, 0)
            best, best_id = _keep_first_max(key, token, best, best_id)  # ties keep the earlier rank
            if HAS_INF:
                r_inf_keys = tl.sum(tl.where(arrays[:, None] == 2, values, 0), axis=0).to(tl.float32, bitcast=True)
                r_inf_ids = tl.sum(tl.where(arrays[:, None] == 3, values, 0), axis=0)
                r_inf_keys = tl.where(cmask, r_inf_keys, float("-inf"))
                key, token = _first_argmax(r_inf_keys, r_inf_ids, 0)
                inf_best, inf_best_id = _keep_first_max(key, token, inf_best, inf_best_id)
        token = tl.where(best > float("-inf"), best_id, 0)
        if HAS_INF:
            token = tl.where(inf_best > float("-inf"), inf_best_id, token)
        tl.store(out_ptr + row, token.to(tl.int64))
    tl.store(epoch_ptr + pid, epoch)


def fits(partials: Partials) -> bool:
    """Whether `partials` fit the exchange's buffer (else they go through an all-gather); a
    function of their shapes alone, so every rank decides alike."""
    n_rows, n_chunks = partials.keys.shape
    return n_rows <= MAX_ROWS and len(partials.arrays()) * n_chunks <= ROW_WORDS


def exchange_reduce_partials(partials: Partials, buffer_ptrs: torch.Tensor, epochs: torch.Tensor,
                             slot_words: int, rank: int, world_size: int) -> torch.Tensor:
    """The tokens [rows] int64 that every rank's `partials` (contiguous [rows, chunks], alike in
    shape on every rank, ids in rank order) reduce to, the same on every rank.

    buffer_ptrs: int64 [world_size] device tensor with the address of each rank's int64 buffer
    (2 x world_size x slot_words words, zeroed before first use, slot_words >= MAX_ROWS x
    ROW_WORDS), peer-mapped on this device; epochs: this rank's int32 [MAX_PROGRAMS] counters,
    zeroed. Every rank must make the same calls. Captures in a CUDA graph (no host state)."""
    if not fits(partials):
        raise ValueError(f"partials of shape {tuple(partials.keys.shape)} do not fit the exchange's "
                         f"{MAX_ROWS} rows of {ROW_WORDS} words")
    if slot_words < MAX_ROWS * ROW_WORDS:
        raise ValueError(f"a slot of {slot_words} words cannot hold {MAX_ROWS} rows of {ROW_WORDS} words")
    arrays = [a.contiguous() for a in partials.arrays()]
    n_rows, n_chunks = partials.keys.shape
    out = torch.empty(n_rows, dtype=torch.int64, device=partials.keys.device)
    if n_rows == 0:
        return out
    has_inf = len(arrays) == 4
    keys, ids = arrays[0], arrays[1]
    inf_keys, inf_ids = (arrays[2], arrays[3]) if has_inf else (keys, ids)
    _exchange_reduce_kernel[(min(MAX_PROGRAMS, n_rows),)](
        keys, ids, inf_keys, inf_ids, out, buffer_ptrs, epochs,
        n_rows, n_chunks, slot_words,
        RANK=rank, WORLD=world_size, BLOCK_C=max(triton.next_power_of_2(n_chunks), partials.block_c),
        HAS_INF=has_inf, ROW_WORDS=ROW_WORDS, num_warps=1,
    )
    return out


class PartialsExchange:
    """One rank's end of the exchange (sharded_sampling.PartialsExchange): the peers' buffer
    addresses and this rank's epoch counters; made by the custom all-reduce, which owns the
    symmetric buffer."""

    def __init__(self, buffer_ptrs: torch.Tensor, epochs: torch.Tensor, slot_words: int, rank: int,
                 world_size: int) -> None:
        self.buffer_ptrs, self.epochs, self.slot_words = buffer_ptrs, epochs, slot_words
        self.rank, self.world_size = rank, world_size

    def fits(self, partials: Partials) -> bool:
        """Whether `partials` fit the buffer (alike on every rank: shapes only)."""
        return fits(partials)

    def __call__(self, partials: Partials) -> torch.Tensor:
        """Every rank's tokens for `partials` (exchange_reduce_partials)."""
        return exchange_reduce_partials(partials, self.buffer_ptrs, self.epochs, self.slot_words, self.rank,
                                        self.world_size)
