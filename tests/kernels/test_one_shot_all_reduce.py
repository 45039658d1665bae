"""The one-shot all-reduce kernel in the interpreter: ranks simulated one after another in a process.

A rank's kernel waits for its peers' tagged words, so the ranks cannot run one after another as
they are: before rank r runs, the ranks after it are made to look as if they had pushed this
call (their words, tagged with each program's epoch, in their region of rank r's buffer),
exactly the state their own kernels leave. The ranks before r really ran and pushed. Each rank's
result must be the rank-ordered fp32 sum rounded once, identical on every rank, over several
calls (both buffer slots) and sizes spanning one chunk to more chunks than programs.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.one_shot_all_reduce import (
    _BLOCK,
    MAX_PROGRAMS,
    num_programs,
    one_shot_all_reduce_,
    one_shot_embedding_all_reduce,
)
from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run

skip_module_unless_kernels_run()

SLOT = 70_000  # words


def simulated_buffers(world: int, slot_words: int, programs: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each simulated rank's zeroed int64 buffer (two slots of `world` regions of slot_words) and
    epoch counters, and the buffers' addresses as the kernels take them."""
    buffers = [torch.zeros(2 * world * slot_words, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    epochs = [torch.zeros(programs, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    return buffers, epochs, torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=DEVICE)


class SimulatedRanks:
    """Per-rank int64 buffers and epoch counters (host memory in the interpreter; on a GPU, the
    peers' buffers are other allocations on the same device)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.buffers, self.epochs, self.buffer_ptrs = simulated_buffers(world, SLOT, MAX_PROGRAMS)

    def all_reduce(self, xs: list[torch.Tensor], run=None) -> list[torch.Tensor]:
        """Every rank's kernel on its own copy of xs[rank] (or `run(rank)`, whose rank pushes
        xs[rank]); before rank r runs, the ranks after it are made to look as if they had pushed
        (their tagged words in rank r's buffer)."""
        words = xs[0].numel() // 2
        programs = num_programs(xs[0].numel())
        # Each program counts its own calls (a call with fewer programs leaves the others behind);
        # chunk c of _BLOCK words belongs to program c % programs.
        epochs = [int(e) % (1 << 30) + 1 for e in self.epochs[0][:programs]]
        results = []
        for rank in range(self.world):
            for later in range(rank + 1, self.world):
                data = xs[later].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
                for chunk, begin in enumerate(range(0, words, _BLOCK)):
                    epoch = epochs[chunk % programs]
                    start = ((epoch % 2) * self.world + later) * SLOT + begin
                    end = min(begin + _BLOCK, words)
                    self.buffers[rank][start : start + end - begin] = data[begin:end] | (epoch << 32)
            if run is not None:
                results.append(run(rank))
                continue
            x = xs[rank].clone()
            one_shot_all_reduce_(x, self.buffer_ptrs, self.epochs[rank], SLOT, rank, self.world)
            results.append(x)
        # The last rank ran after every other really pushed: it consumed (zeroed) all their words.
        last = self.buffers[self.world - 1]
        for earlier in range(self.world - 1):
            for epoch in set(epochs):
                start = ((epoch % 2) * self.world + earlier) * SLOT
                assert not bool(last[start : start + words].any())
        return results


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_rank_gets_the_rank_ordered_sum_over_repeated_calls_and_sizes(world: int, dtype: torch.dtype) -> None:
    ranks = SimulatedRanks(world)
    gen = torch.Generator().manual_seed(world)
    for n in (8, 2048, 4096 + 8, 2 * _BLOCK * MAX_PROGRAMS + 2048, 8):  # one chunk .. more chunks than programs
        xs = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for _ in range(world)]
        expected = xs[0].float()
        for x in xs[1:]:
            expected = expected + x.float()  # rank order, fp32
        results = ranks.all_reduce(xs)
        for result in results:
            assert torch.equal(result, results[0])  # the same bits on every rank
            # One rounding of the fp32 sum (the interpreter may truncate rather than round to nearest).
            assert torch.allclose(result.float(), expected, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                  atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_embedding_lookup_and_all_reduce_give_the_whole_tables_rows(world: int) -> None:
    ranks = SimulatedRanks(world)
    vocab, hidden = 50, 40
    per_rank = -(-vocab // world) + 1  # the last rank's slice ends in padding (zero rows)
    table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEVICE)
    slices = [torch.zeros(per_rank, hidden, dtype=torch.bfloat16, device=DEVICE) for _ in range(world)]
    for r, part in enumerate(slices):
        rows = table[r * per_rank : (r + 1) * per_rank]
        part[: rows.shape[0]] = rows
    # One token; tokens at the slices' edges, repeated; every token (several chunks and programs).
    for ids in ([3], [0, per_rank - 1, per_rank, vocab - 1, vocab - 1, 5], list(range(vocab))):
        ids = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
        # What each rank pushes: its slice's rows of the tokens it holds, zeros for the others.
        lookups = []
        for r in range(world):
            local = ids - r * per_rank
            mine = (local >= 0) & (local < per_rank)
            lookups.append((slices[r][local.clamp(0, per_rank - 1)] * mine[:, None]).reshape(-1))
        results = ranks.all_reduce(lookups, run=lambda rank: one_shot_embedding_all_reduce(
            ids, slices[rank], rank * per_rank, ranks.buffer_ptrs, ranks.epochs[rank], SLOT, rank, world))
        for result in results:
            assert torch.equal(result, table[ids])  # one nonzero term per element: exact


def test_epochs_start_over_without_confusing_a_slot() -> None:
    ranks = SimulatedRanks(2)
    for epochs in ranks.epochs:
        epochs.fill_((1 << 30) - 1)  # the next calls use epochs 2^30, then 1, 2: the parity keeps alternating
    gen = torch.Generator().manual_seed(7)
    for n in (4096, 4096, 4096):
        xs = [torch.randn(n, generator=gen).bfloat16().to(DEVICE) for _ in range(2)]
        results = ranks.all_reduce(xs)
        assert torch.equal(results[0], results[1])
        assert torch.allclose(results[0].float(), xs[0].float() + xs[1].float(), rtol=2 ** -7, atol=1e-6)
    assert ranks.epochs[0][0].item() == 2


def test_refuses_what_it_cannot_take() -> None:
    ranks = SimulatedRanks(2)
    with pytest.raises(ValueError, match="16-bit"):
        one_shot_all_reduce_(torch.zeros(8, device=DEVICE), ranks.buffer_ptrs, ranks.epochs[0], SLOT, 0, 2)
    with pytest.raises(ValueError, match="even numel"):
        one_shot_all_reduce_(torch.zeros(7, dtype=torch.bfloat16, device=DEVICE), ranks.buffer_ptrs, ranks.epochs[0], SLOT, 0, 2)
    with pytest.raises(ValueError, match="do not fit"):
        one_shot_all_reduce_(torch.zeros(2 * SLOT + 2, dtype=torch.bfloat16, device=DEVICE), ranks.buffer_ptrs, ranks.epochs[0], SLOT, 0, 2)
    with pytest.raises(ValueError, match="contiguous"):
        one_shot_all_reduce_(torch.zeros(8, 2, dtype=torch.bfloat16, device=DEVICE).t(), ranks.buffer_ptrs, ranks.epochs[0], SLOT, 0, 2)
