"""The one-shot exchange of sharded sampling's partials (one_shot_argmax.py) in the interpreter,
ranks simulated one after another in a process, as in test_one_shot_all_reduce.py: before rank r
runs, the ranks after it are made to look as if they had pushed this call (their tagged words in
rank r's buffer, exactly what their kernels leave); the ranks before r really ran and pushed.
Every rank must get the unsplit sampler's tokens bit for bit, over repeated calls (both slots).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagedllm import one_shot_argmax  # noqa: E402
from pagedllm.one_shot_argmax import (  # noqa: E402
    MAX_PROGRAMS,
    MAX_ROWS,
    ROW_WORDS,
    PartialsExchange,
    exchange_reduce_partials,
)
from pagedllm.worker import triton_sampling as ts  # noqa: E402
from pagedllm.worker.sampler import sample_greedy  # noqa: E402
from pagedllm.worker.sharded_sampling import Partials, VocabShard  # noqa: E402

from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run  # noqa: E402
from tests.kernels.test_one_shot_all_reduce import simulated_buffers  # noqa: E402
from tests.kernels.test_sharded_sampling import (  # noqa: E402
    TILES,
    VOCAB,
    logits_with_bad_rows,
    mixed_batch,
    padded_slices,
)

skip_module_unless_kernels_run()

SLOT = MAX_ROWS * ROW_WORDS


class SimulatedRanks:
    """Per-rank int64 buffers and epoch counters (host memory in the interpreter; on a GPU, the
    peers' buffers are other allocations on the same device)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.buffers, self.epochs, self.buffer_ptrs = simulated_buffers(world, SLOT, MAX_PROGRAMS)

    def place_later_ranks(self, rank: int, per_rank: list[Partials]) -> None:
        """What the kernels of the ranks after `rank` leave in its buffer: each row's arrays in the
        row's span of their region, tagged with the epoch of the row's program (r % MAX_PROGRAMS)."""
        programs = one_shot_argmax.MAX_PROGRAMS  # tests may lower it
        n_rows, n_chunks = per_rank[0].keys.shape
        for later in range(rank + 1, self.world):
            for row in range(n_rows):
                epoch = int(self.epochs[rank][row % programs]) % (1 << 30) + 1
                base = ((epoch % 2) * self.world + later) * SLOT + row * ROW_WORDS
                for a, array in enumerate(per_rank[later].arrays()):
                    words = array[row].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
                    self.buffers[rank][base + a * n_chunks : base + (a + 1) * n_chunks] = words | (epoch << 32)

    def exchange(self, per_rank: list[Partials]) -> list[torch.Tensor]:
        """Every rank's kernel on its own partials, one rank after another."""
        results = []
        for rank in range(self.world):
            self.place_later_ranks(rank, per_rank)
            results.append(exchange_reduce_partials(per_rank[rank], self.buffer_ptrs, self.epochs[rank], SLOT,
                                                    rank, self.world))
        # The last rank ran after every other really pushed, and it consumed (zeroed) their words.
        assert not bool(self.buffers[-1].any())
        return results


@pytest.mark.parametrize("world", [2, 3])
def test_greedy_rows_get_the_unsplit_argmax_on_every_rank(world: int) -> None:
    ranks = SimulatedRanks(world)
    for seed in (0, 1, 2):  # three calls: both slots, then the first again
        logits = logits_with_bad_rows(5, seed).to(torch.bfloat16)
        logits[4, 17] = logits[4, 1000] = 50.0  # a tie between the first and the last rank's slices
        expected = sample_greedy(logits.float().clone())
        per_rank = [ts.argmax_partials(x, col_offset=a, num_tokens=n, **TILES) for a, n, x in padded_slices(logits, world)]
        for tokens in ranks.exchange(per_rank):
            assert torch.equal(tokens, expected)
    assert expected[1].item() == 10 and expected[2].item() == 300 and expected[3].item() == 0
    assert expected[4].item() == 17


def test_race_rows_get_the_unsplit_draw_with_more_rows_than_programs(monkeypatch) -> None:
    monkeypatch.setattr(one_shot_argmax, "MAX_PROGRAMS", 2)  # rows 2.. share programs 0 and 1 with rows 0, 1
    ranks = SimulatedRanks(2)
    logits = logits_with_bad_rows(5, 3)
    temperature = torch.tensor([0.5, 1.0, 0.7, 1.3, 2.0], device=DEVICE)
    expected = ts.gumbel_max_sample(logits, temperature, 11, None, **TILES)
    for _ in range(2):
        per_rank = [ts.race_partials(x, temperature, 11, None, col_offset=a, num_tokens=n, vocab_size=VOCAB, **TILES)
                    for a, n, x in padded_slices(logits, 2)]
        assert per_rank[0].inf_keys is not None  # the +inf race travels too
        for tokens in ranks.exchange(per_rank):
            assert torch.equal(tokens, expected)
    assert [int(e) for e in ranks.epochs[0][:3]] == [2, 2, 0]  # one count per call of each program


def test_epochs_start_over_without_confusing_a_slot() -> None:
    ranks = SimulatedRanks(2)
    for epochs in ranks.epochs:
        epochs.fill_((1 << 30) - 1)  # the next calls use epochs 2^30, then 1, 2
    logits = logits_with_bad_rows(4, 9)
    expected = sample_greedy(logits.clone())
    for _ in range(3):
        per_rank = [ts.argmax_partials(x, col_offset=a, num_tokens=n, **TILES) for a, n, x in padded_slices(logits, 2)]
        for tokens in ranks.exchange(per_rank):
            assert torch.equal(tokens, expected)
    assert ranks.epochs[0][0].item() == 2


def test_refuses_partials_that_do_not_fit() -> None:
    ranks = SimulatedRanks(2)
    exchange = PartialsExchange(ranks.buffer_ptrs, ranks.epochs[0], SLOT, 0, 2)
    too_many_rows = Partials(torch.zeros(MAX_ROWS + 1, 2, device=DEVICE),
                             torch.zeros(MAX_ROWS + 1, 2, dtype=torch.int32, device=DEVICE))
    too_many_chunks = Partials(torch.zeros(1, ROW_WORDS // 2 + 1, device=DEVICE),
                               torch.zeros(1, ROW_WORDS // 2 + 1, dtype=torch.int32, device=DEVICE))
    assert not exchange.fits(too_many_rows) and not exchange.fits(too_many_chunks)
    with pytest.raises(ValueError, match="do not fit"):
        exchange(too_many_chunks)


def test_sampler_uses_the_exchange_for_greedy_and_race_rows() -> None:
    # One batch of greedy and temperature-only rows: one exchange for each kind of partials.
    md, logits, sampler, expected = mixed_batch()
    shards = padded_slices(logits, 2)
    ranks = SimulatedRanks(2)

    class Recorder:
        """Pass 1: what each rank would exchange, in call order (tokens are placeholders)."""

        def __init__(self) -> None:
            self.calls: list[Partials] = []

        def fits(self, partials: Partials) -> bool:
            return True

        def __call__(self, partials: Partials) -> torch.Tensor:
            self.calls.append(partials)
            return torch.zeros(partials.keys.shape[0], dtype=torch.int64, device=DEVICE)

    recorders = [Recorder() for _ in shards]
    for (a, n, x), recorder in zip(shards, recorders):
        torch.manual_seed(5)
        sampler.forward_sharded(x, md, VocabShard(a, n, VOCAB, lambda t: pytest.fail("no all-gather"), recorder))
    assert [len(r.calls) for r in recorders] == [2, 2]  # greedy, then race

    class Replay:
        """Pass 2: rank `rank`'s real kernel, after the later ranks' words of the same call are placed."""

        def __init__(self, rank: int) -> None:
            self.rank, self.call = rank, 0

        def fits(self, partials: Partials) -> bool:
            return True

        def __call__(self, partials: Partials) -> torch.Tensor:
            ranks.place_later_ranks(self.rank, [r.calls[self.call] for r in recorders])
            self.call += 1
            return exchange_reduce_partials(partials, ranks.buffer_ptrs, ranks.epochs[self.rank], SLOT, self.rank, 2)

    for rank, (a, n, x) in enumerate(shards):
        torch.manual_seed(5)
        out = sampler.forward_sharded(x, md, VocabShard(a, n, VOCAB, lambda t: pytest.fail("no all-gather"), Replay(rank)))
        assert torch.equal(out.sampled_token_ids, expected)


def test_partials_that_do_not_fit_go_through_the_all_gather() -> None:
    md, logits, sampler, expected = mixed_batch((0.0, 0.0, 0.0, 0.0))
    shards = padded_slices(logits, 2)

    class Refuses:
        def fits(self, partials: Partials) -> bool:
            return False

        def __call__(self, partials: Partials) -> torch.Tensor:
            raise AssertionError("the exchange must not run")

    sent: list[torch.Tensor] = []
    for a, n, x in shards:  # pass 1 records, pass 2 hands every rank everything
        sampler.forward_sharded(x, md, VocabShard(a, n, VOCAB, lambda t: sent.append(t) or t, Refuses()))
    everything = torch.cat(sent)
    for a, n, x in shards:
        out = sampler.forward_sharded(x, md, VocabShard(a, n, VOCAB, lambda t: everything, Refuses()))
        assert torch.equal(out.sampled_token_ids, expected)
