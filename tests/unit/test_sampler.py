"""Specification of the sampler: processing order, filters, seeding, logprobs, robustness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import CachedRequestState
from pagedllm.worker.sampler import (
    Sampler,
    apply_penalties_,
    candidate_thresholds,
    compute_logprobs,
    exponential_race,
    sample_random,
)
from pagedllm.worker.sampling_metadata import SamplingMetadata, SamplingMetadataCache, build_sampling_metadata

CPU = torch.device("cpu")


def metadata(
    params: list[SamplingParams],
    vocab_size: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingMetadata:
    n = len(params)
    return build_sampling_metadata(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        generators if generators is not None else [None] * n,
        vocab_size,
        CPU,
    )


def sample(logits: torch.Tensor, params: list[SamplingParams], **kwargs: object) -> torch.Tensor:
    md = metadata(params, logits.shape[-1], **kwargs)  # type: ignore[arg-type]
    return Sampler().forward(logits.clone(), md).sampled_token_ids


def seeded_logits(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- greedy, logit bias, min_tokens -------------------------------------------------------


def test_greedy_rows_take_the_argmax() -> None:
    logits = seeded_logits(0, (6, 300))
    assert torch.equal(sample(logits, [SamplingParams(temperature=0.0)] * 6), logits.argmax(-1))


def test_greedy_rows_in_a_mixed_batch_take_the_argmax() -> None:
    logits = seeded_logits(1, (6, 300))
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    sampled = sample(logits, params)
    assert torch.equal(sampled[::2], logits[::2].argmax(-1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_forces_a_token(temperature: float) -> None:
    torch.manual_seed(0)
    logits = seeded_logits(2, (8, 500))
    params = [SamplingParams(temperature=temperature, logit_bias={42: 100.0})] * 8
    assert sample(logits, params).tolist() == [42] * 8


def test_min_tokens_blocks_stop_tokens_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    params.update_from_generation_config({7})  # eos counts as a stop token too
    logits = torch.zeros(2, 20)
    logits[:, 5], logits[:, 7], logits[:, 9] = 10.0, 9.0, 1.0
    assert sample(logits, [params] * 2, outputs=[[1], [1, 2]]).tolist() == [9, 9]


def test_stop_tokens_are_allowed_once_min_tokens_is_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    logits = torch.zeros(1, 20)
    logits[0, 5] = 10.0
    assert sample(logits, [params], outputs=[[1, 2, 3]]).tolist() == [5]


# ---- penalties ----------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0, 0.5]])
    md = metadata([SamplingParams(repetition_penalty=2.0)], 6, prompts=[[0, 1]], outputs=[[2, 3, 3]])
    apply_penalties_(logits, md)
    # Seen in prompt (0, 1) or output (2, 3); 4 and 5 untouched.
    assert torch.equal(logits, torch.tensor([[1.0, -4.0, 1.5, -2.0, 4.0, 0.5]]))


def test_frequency_and_presence_penalties_subtract_over_output_tokens_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    md = metadata([params], 4, prompts=[[0]], outputs=[[1, 2, 2, 2]])
    apply_penalties_(logits, md)
    # token 0 only in the prompt: untouched; 1 seen once; 2 seen three times.
    expected = torch.tensor([[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0]])
    assert torch.equal(logits, expected)


def test_repetition_penalty_applies_before_frequency_and_presence() -> None:
    logits = torch.tensor([[3.0, -3.0]])
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0)
    md = metadata([params], 2, outputs=[[0, 1, 1]])
    apply_penalties_(logits, md)
    assert torch.equal(logits, torch.tensor([[3.0 / 1.5 - 1.0 - 1.0, -3.0 * 1.5 - 2.0 - 1.0]]))


def test_penalties_leave_rows_without_penalties_unchanged() -> None:
    logits = seeded_logits(3, (3, 50))
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0), SamplingParams()]
    md = metadata(params, 50, prompts=[[1, 2]] * 3, outputs=[[3, 4]] * 3)
    apply_penalties_(logits, md)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert not torch.equal(logits[1], before[1])


# ---- filters ------------------------------------------------------------------------------


def reference_allowed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tokens each filter allows, computed directly in fp64 and with a little slack, so the
    sampler's fp32 set must be a subset of it."""
    scaled = logits.double() / params.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < params.top_k < scaled.numel():
        keep &= scaled >= scaled.topk(params.top_k).values[-1]
    probs = torch.softmax(scaled.masked_fill(~keep, -math.inf), -1)
    if params.top_p < 1.0:
        values = probs.sort(descending=True).values
        before = values.cumsum(0) - values
        last = int((before < params.top_p + 1e-4).sum()) - 1
        keep &= probs >= values[last] * (1 - 1e-4)
    full = torch.softmax(scaled, -1)
    keep &= full >= params.min_p * full.max() * (1 - 1e-4)
    return keep


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab_size=st.integers(2, 3000),
    top_k=st.integers(0, 3500),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    temperature=st.floats(0.1, 3.0),
    scale=st.sampled_from([0.3, 3.0, 10.0]),
    ties=st.booleans(),
)
def test_top_k_top_p_min_p_never_emit_a_token_outside_the_allowed_set(
    seed: int, vocab_size: int, top_k: int, top_p: float, min_p: float, temperature: float, scale: float, ties: bool
) -> None:
    logits = seeded_logits(seed, (vocab_size,), scale)
    if ties:
        logits = logits.round()  # many exact ties at every threshold
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    allowed = reference_allowed(logits, params)
    # 56 unseeded rows share one batched draw; 8 seeded rows are sampled one at a time.
    generators = [None] * 56 + [torch.Generator().manual_seed(seed + i) for i in range(8)]
    torch.manual_seed(seed)
    sampled = sample(logits.expand(64, -1), [params] * 64, generators=generators)
    assert allowed[sampled].all(), sorted(set(sampled.tolist()) - set(allowed.nonzero().flatten().tolist()))


def test_top_p_finds_a_nucleus_larger_than_the_first_candidates() -> None:
    # A flat distribution: the 0.95 nucleus holds thousands of tokens, far beyond 128.
    logits = seeded_logits(4, (4000,), 0.1)
    torch.manual_seed(0)
    sampled = sample(logits.expand(256, -1), [SamplingParams(top_p=0.95)] * 256)
    ranks = (logits.unsqueeze(0) > logits[sampled].unsqueeze(1)).sum(-1)
    assert int(ranks.max()) >= 1000  # tokens deep in the nucleus do get sampled
    assert int(ranks.max()) < 3900  # the 5% tail never does (~200 tokens)


def test_top_k_larger_than_the_vocabulary_keeps_every_token() -> None:
    md = metadata([SamplingParams(top_k=10_000)], 50)
    assert md.no_top_k and int(md.top_k[0]) == 0
    logits = torch.zeros(2000, 50)
    torch.manual_seed(0)
    sampled = sample_random(logits, torch.ones(2000), top_k=torch.full((2000,), 10_000))
    assert len(set(sampled.tolist())) == 50


def test_candidates_ending_in_zero_probability_cover_the_row() -> None:
    # At a low temperature the k-th value underflows to 0: every token left out has P = 0,
    # so the row must not be sent on to a larger candidate set (a full sort).
    values = torch.tensor([[1.0, 0.3, 0.0, 0.0]])
    threshold, covered = candidate_thresholds(values, torch.tensor([4]), None, None, None, complete=False)
    assert bool(covered.all()) and float(threshold[0]) == 0.0


def test_candidates_cut_at_a_tie_with_the_last_one_need_more() -> None:
    values = torch.tensor([[1.0, 0.5, 0.5, 0.5]])
    _, covered = candidate_thresholds(values, torch.tensor([2]), None, None, None, complete=False)
    assert not bool(covered.any())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_the_softmax_of_scaled_logits(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    n = 60_000
    torch.manual_seed(1234)
    sampled = sample(logits.expand(n, -1), [SamplingParams(temperature=temperature)] * n)
    counts = torch.bincount(sampled, minlength=6).double()
    # 5 degrees of freedom: P(chi2 > 30) ~ 1.5e-5; the seed is fixed, so this is not flaky.
    assert chi_square(counts, torch.softmax(logits.double() / temperature, -1)) < 30.0


def test_top_k_sampling_follows_the_renormalised_distribution_of_the_top_k() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 3.0, -3.0])
    n = 60_000
    torch.manual_seed(99)
    sampled = sample(logits.expand(n, -1), [SamplingParams(top_k=4)] * n)
    counts = torch.bincount(sampled, minlength=8).double()
    top = [6, 0, 1, 2]
    assert counts[top].sum() == n
    assert chi_square(counts[top], torch.softmax(logits[top].double(), -1)) < 25.0  # 3 dof


def test_exponential_race_never_picks_a_zero_weight() -> None:
    weights = torch.zeros(5000, 40)
    weights[:, 17] = 1.0
    weights[::2, 3] = 1e-30
    picked = exponential_race(weights)
    assert set(picked.tolist()) <= {3, 17}


# ---- seeding ------------------------------------------------------------------------------

SEEDED_PARAMS = [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7),
    SamplingParams(temperature=1.3, min_p=0.05, seed=7),
]


def run_seeded(target: SamplingParams, batch_size: int, position: int, steps: int) -> list[int]:
    """Sample the target row for several steps with one persistent generator."""
    generator = torch.Generator().manual_seed(target.seed or 0)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=3, seed=11),
        SamplingParams(min_p=0.2, repetition_penalty=1.2),
    ]
    tokens = []
    for step in range(steps):
        params = [others[(i + step) % len(others)] for i in range(batch_size)]
        generators = [
            torch.Generator().manual_seed(100 + i) if p.seed is not None else None for i, p in enumerate(params)
        ]
        params[position], generators[position] = target, generator
        logits = seeded_logits(1000 * batch_size + step, (batch_size, 1000), 2.0)  # the others differ per run
        logits[position] = seeded_logits(step, (1000,), 2.0)  # the target's logits do not
        torch.manual_seed(step + batch_size)  # unseeded rows draw different noise per run
        tokens.append(int(sample(logits, params, outputs=[[1, 2]] * batch_size, generators=generators)[position]))
    return tokens


@pytest.mark.parametrize("target", SEEDED_PARAMS, ids=["plain", "top_k_top_p", "min_p"])
def test_seeded_row_gives_the_same_tokens_whatever_the_batch(target: SamplingParams) -> None:
    alone = run_seeded(target, batch_size=1, position=0, steps=6)
    assert len(set(alone)) > 1  # the row really samples
    assert run_seeded(target, batch_size=8, position=5, steps=6) == alone
    assert run_seeded(target, batch_size=8, position=0, steps=6) == alone


# ---- logprobs -----------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits_with_ranks_of_the_sampled_token() -> None:
    logits = seeded_logits(5, (4, 64))
    params = [
        SamplingParams(temperature=0.0, logprobs=5, logit_bias={3: 50.0}),
        SamplingParams(logprobs=2, repetition_penalty=1.5),
        SamplingParams(top_k=5, logprobs=0),
        SamplingParams(temperature=0.0),
    ]
    md = metadata(params, 64, outputs=[[1, 2]] * 4)
    out = Sampler().forward(logits.clone(), md)
    expected = torch.log_softmax(logits, -1)
    assert out.logprobs is not None
    for row in range(4):
        token = int(out.sampled_token_ids[row])
        ids, values = out.logprobs.token_ids[row], out.logprobs.logprobs[row]
        assert ids[0] == token and len(ids) == 6  # max_num_logprobs = 5 for every row
        assert ids[1:] == expected[row].topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor(values), expected[row, ids])
        assert out.logprobs.ranks[row] == int((expected[row] > expected[row, token]).sum()) + 1
    assert out.logprobs.token_ids[0][0] == 3  # the bias chose the token, not the logprobs


def test_compute_logprobs_rank_counts_strictly_more_likely_tokens() -> None:
    logprobs = torch.log(torch.tensor([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]]))
    lists = compute_logprobs(logprobs, 1, torch.tensor([1, 2]))
    assert lists.ranks == [1, 3]
    assert lists.token_ids == [[1, 0], [2, 0]]


def test_no_logprobs_are_returned_when_no_row_asks() -> None:
    out = Sampler().forward(seeded_logits(6, (2, 10)), metadata([SamplingParams()] * 2, 10))
    assert out.logprobs is None


# ---- robustness ---------------------------------------------------------------------------


def broken_logits() -> torch.Tensor:
    nan, inf = math.nan, math.inf
    logits = seeded_logits(7, (6, 32))
    logits[0] = nan  # all NaN
    logits[1, 4] = nan  # one NaN among finite values
    logits[2, 9] = inf
    logits[3] = -inf  # nothing valid
    logits[4, 2], logits[4, 11] = nan, inf
    logits[5, ::2] = -inf
    return logits


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(logprobs=3), SamplingParams(top_p=0.8, top_k=5)],
    ids=["greedy", "random", "top_k_top_p"],
)
def test_nan_and_inf_logits_give_valid_token_ids(params: SamplingParams) -> None:
    logits = broken_logits()
    torch.manual_seed(0)
    sampled = sample(logits, [params] * 6).tolist()
    assert all(0 <= t < 32 for t in sampled)
    assert sampled[2] == 9 and sampled[3] == 0 and sampled[4] == 11  # +inf wins; dead row -> 0
    assert sampled[1] != 4 and sampled[5] % 2 == 1


def test_nan_rows_give_finite_logprobs() -> None:
    out = Sampler().forward(broken_logits(), metadata([SamplingParams(temperature=0.0, logprobs=2)] * 6, 32))
    assert out.logprobs is not None
    assert not any(math.isnan(v) for row in out.logprobs.logprobs for v in row)


def test_empty_batch_samples_nothing() -> None:
    out = Sampler().forward(torch.empty(0, 16), metadata([], 16))
    assert out.sampled_token_ids.shape == (0,)


def test_build_sampling_metadata_rejects_rows_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        build_sampling_metadata([SamplingParams()], [[1]], [], [None], 10, CPU)


# ---- metadata reuse and the all-greedy fast path ------------------------------------------


def _state(req_id: str, params: SamplingParams, output: list[int] | None = None) -> CachedRequestState:
    return CachedRequestState(req_id, [5, 6, 7], list(output or []), params, None, [0], 0)


def test_metadata_is_reused_while_the_same_requests_sample() -> None:
    cache = SamplingMetadataCache()
    states = [_state("a", SamplingParams(temperature=0.0)), _state("b", SamplingParams(temperature=0.7, top_p=0.9))]
    first = cache.get(states, 32, CPU)
    states[0].append_output_token(3)  # decoding does not change the metadata
    assert cache.get(list(states), 32, CPU) is first
    assert cache.get(states[:1], 32, CPU) is not first  # a request left
    resumed = [_state("a", SamplingParams(temperature=0.0)), states[1]]  # same id, new state (preempted)
    assert cache.get(resumed, 32, CPU) is not cache.get(states, 32, CPU)


@pytest.mark.parametrize("params", [SamplingParams(repetition_penalty=1.2), SamplingParams(presence_penalty=0.5),
                                    SamplingParams(min_tokens=2)])
def test_metadata_reading_output_tokens_is_rebuilt_every_step(params: SamplingParams) -> None:
    cache = SamplingMetadataCache()
    params._all_stop_token_ids = {2}
    states = [_state("a", params)]
    first = cache.get(states, 32, CPU)
    assert not first.reusable and cache.get(states, 32, CPU) is not first
    states[0].append_output_token(2)
    states[0].append_output_token(2)
    # Once min_tokens is reached nothing depends on the outputs any more.
    assert cache.get(states, 32, CPU).reusable == (params.min_tokens == 2)


def test_all_greedy_fast_path_samples_as_the_general_path() -> None:
    logits = seeded_logits(7, (5, 50))
    fast = metadata([SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, logprobs=1)] * 5, 50)
    assert fast.all_greedy and fast.reusable and fast.max_num_logprobs == 1
    # A presence penalty takes the general path; without output tokens it changes no logit.
    general = metadata([SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, logprobs=1,
                                       presence_penalty=0.5)] * 5, 50)
    assert not general.no_penalties
    fast_out = Sampler().forward(logits.clone(), fast)
    general_out = Sampler().forward(logits.clone(), general)
    assert torch.equal(fast_out.sampled_token_ids, logits.argmax(-1))
    assert torch.equal(fast_out.sampled_token_ids, general_out.sampled_token_ids)
    assert fast_out.logprobs == general_out.logprobs
