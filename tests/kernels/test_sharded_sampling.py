"""Sampling from vocabulary slices (sharded_sampling.py): each simulated tensor-parallel rank
computes its slice's partial winners, the ranks' partials are joined as `gather_partials` joins
them, and every rank's reduce must give the unsplit sampler's tokens bit for bit.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py).
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.worker import triton_sampling as ts  # noqa: E402
from pagedllm.worker.sampler import Sampler, sample_greedy  # noqa: E402
from pagedllm.worker.sampling_metadata import SamplingMetadata, build_sampling_metadata  # noqa: E402
from pagedllm.worker.sharded_sampling import (  # noqa: E402
    Partials,
    VocabShard,
    argmax_partials_torch,
    gather_partials,
    reduce_partials_torch,
    sharded_applies,
)

from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run  # noqa: E402

skip_module_unless_kernels_run()

VOCAB = 1003  # not a multiple of 4: the last slice ends mid Philox group
TILES = dict(block_size=16, tiles_per_chunk=2)  # several chunks per slice on a small vocabulary


def logits_with_bad_rows(rows: int, seed: int = 0) -> torch.Tensor:
    """Random fp32 logits; row 1 holds NaNs and a tie across slices, row 2 two +inf, row 3 nothing finite."""
    x = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    x[1, 10] = x[1, 900] = 40.0  # the same maximum in two slices: the first token wins
    x[1, ::7] = float("nan")
    x[2, 300] = x[2, 998] = float("inf")
    x[3] = float("-inf")
    x[3, ::5] = float("nan")
    return x.to(DEVICE)


def join(per_rank: list[list[Partials | None]]) -> list[list[Partials | None]]:
    """Each rank's view of gather_partials over every rank: pass 1 records what each rank would
    send, pass 2 hands every rank all of it."""
    sent: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        sent.append(x)
        return x

    for partials in per_rank:
        gather_partials(partials, record)
    everything = torch.cat(sent)
    return [gather_partials(partials, lambda x: everything) for partials in per_rank]


def slices(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:]))


def padded_slices(logits: torch.Tensor, ranks: int) -> list[tuple[int, int, torch.Tensor]]:
    """(col_offset, num_tokens, logits of one rank) as a vocabulary-parallel LM head splits them:
    one width on every rank, the last one's tail padding (+inf here: it must never be read)."""
    width = -(-VOCAB // ranks)
    if ranks > 1:
        width = -(-width // 4) * 4 if width % 4 and VOCAB > 4 * ranks else width
    full = torch.full((logits.shape[0], ranks * width), float("inf"), dtype=logits.dtype, device=logits.device)
    full[:, :VOCAB] = logits
    return [(r * width, min(width, VOCAB - r * width), full[:, r * width : (r + 1) * width]) for r in range(ranks)]


@pytest.mark.parametrize("with_rows", [False, True])
def test_race_over_slices_draws_the_unsplit_race(with_rows):
    logits = logits_with_bad_rows(6)
    temperature = torch.tensor([0.5, 1.0, 0.7, 1.3, 2.0, 0.9], device=DEVICE)
    rows = torch.tensor([5, 0, 2, 3], device=DEVICE) if with_rows else None
    for seed in (3,):
        expected = ts.gumbel_max_sample(logits, temperature, seed, rows, **TILES)
        per_rank = [[ts.race_partials(x, temperature, seed, rows, col_offset=a, num_tokens=n, vocab_size=VOCAB, **TILES)]
                    for a, n, x in padded_slices(logits, 4)]  # widths of 252: offsets 4-aligned
        for (joined,) in join(per_rank):
            assert torch.equal(ts.reduce_partials(joined), expected)


def test_race_needs_four_aligned_slices():
    logits = logits_with_bad_rows(4)
    with pytest.raises(ValueError, match="4-aligned slice"):
        ts.race_partials(logits[:, 2:500], torch.ones(4, device=DEVICE), 1, col_offset=2, vocab_size=VOCAB)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_argmax_over_slices_is_the_unsplit_argmax(kernels):
    logits = logits_with_bad_rows(5).to(torch.bfloat16)
    expected = sample_greedy(logits.float().clone())
    if kernels == "triton":  # widths of 335: offsets that are not 4-aligned
        per_rank = [[ts.argmax_partials(x, col_offset=a, num_tokens=n, **TILES)] for a, n, x in padded_slices(logits, 3)]
        reduce = ts.reduce_partials
    else:  # one partial per rank whatever the widths: any bounds, a one-token slice among them
        bounds = [0, 333, 334, 700, VOCAB]
        per_rank = [[argmax_partials_torch(logits[:, a:b], a)] for a, b in slices(bounds)]
        reduce = reduce_partials_torch
    for (joined,) in join(per_rank):
        assert torch.equal(reduce(joined), expected)
    assert expected[1].item() == 10 and expected[2].item() == 300 and expected[3].item() == 0


def test_empty_slice_contributes_nothing():
    logits = logits_with_bad_rows(4)
    partials = [[argmax_partials_torch(logits[:, :VOCAB], 0)], [argmax_partials_torch(logits[:, :0], VOCAB)]]
    for (joined,) in join(partials):
        assert torch.equal(reduce_partials_torch(joined), sample_greedy(logits.clone()))


def mixed_batch(temperatures: tuple[float, ...] = (0.0, 0.8, 0.0, 1.2, 0.5, 0.0)
                ) -> tuple[SamplingMetadata, torch.Tensor, Sampler, torch.Tensor]:
    """A batch of greedy (0.0) and temperature-only rows: its metadata, bf16 logits, a sampler
    with the Triton kernels, and the unsplit sampler's tokens (race seeded by torch seed 5)."""
    n = len(temperatures)
    params = [SamplingParams(temperature=t, max_tokens=4) for t in temperatures]
    md = build_sampling_metadata(params, [[]] * n, [[]] * n, [None] * n, VOCAB, DEVICE)
    logits = logits_with_bad_rows(n).to(torch.bfloat16)
    sampler = Sampler(use_triton=True)
    sampler.triton_on_cpu = True
    torch.manual_seed(5)
    return md, logits, sampler, sampler.forward(logits.clone(), md).sampled_token_ids


def test_sampler_forward_sharded_matches_forward():
    # Greedy and temperature-only rows in one batch: the greedy argmax and the race on the
    # unseeded rows, both joined by one gather.
    md, logits, sampler, expected = mixed_batch()
    ranks = padded_slices(logits, 2)
    assert all(sampler.sharded_applies(md, DEVICE, a) for a, _, _ in ranks)

    sent: list[torch.Tensor] = []
    results = []
    for replay in (False, True):
        everything = torch.cat(sent) if replay else None
        for a, n, x in ranks:
            torch.manual_seed(5)  # every rank draws the same race seed

            def all_gather(x: torch.Tensor) -> torch.Tensor:
                if everything is None:
                    sent.append(x)
                    return x
                return everything

            out = sampler.forward_sharded(x, md, VocabShard(a, n, VOCAB, all_gather))
            if replay:
                results.append(out.sampled_token_ids)
    assert all(torch.equal(r, expected) for r in results)


def test_sharded_applies_only_to_argmax_rows():
    def md(**kw: object):
        return build_sampling_metadata([SamplingParams(max_tokens=4, **kw)], [[1]], [[2]], [None], VOCAB, DEVICE)

    assert sharded_applies(md(temperature=0.0), fused_random=False, col_offset=333)
    assert sharded_applies(md(temperature=0.7), fused_random=True, col_offset=500)
    assert not sharded_applies(md(temperature=0.7), fused_random=True, col_offset=502)  # Philox groups
    assert not sharded_applies(md(temperature=0.7), fused_random=False, col_offset=500)  # no Triton race
    sampler = Sampler(use_triton=True)
    sampler.triton_on_cpu = True
    assert sampler.sharded_applies(md(temperature=0.7), DEVICE, 500)
    for whole_row in (dict(temperature=0.0, logprobs=2), dict(temperature=0.0, repetition_penalty=1.2),
                      dict(temperature=0.0, logit_bias={5: 1.0}), dict(temperature=0.0, min_tokens=2, stop_token_ids=[7]),
                      dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_k=5), dict(temperature=0.7, min_p=0.1)):
        assert not sampler.sharded_applies(md(**whole_row), DEVICE, 500), whole_row
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    seeded = build_sampling_metadata([SamplingParams(temperature=0.7, seed=1)], [[1]], [[2]], [generator], VOCAB, DEVICE)
    assert not sampler.sharded_applies(seeded, DEVICE, 500)
    assert not Sampler(use_triton=False).sharded_applies(md(temperature=0.7), DEVICE, 500)


def test_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_SHARDED_SAMPLING", "0")
    md = build_sampling_metadata([SamplingParams(temperature=0.0)], [[1]], [[2]], [None], VOCAB, DEVICE)
    assert not sharded_applies(md, fused_random=True, col_offset=0)
