"""Specification of the fused Gumbel-max sampling kernel and its use by the Sampler.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py). The oracle for exactness is
argmax(logits / T - log(-log(U))) in PyTorch with the kernel's own uniforms (`philox_uniforms`);
the distribution is checked against softmax(logits / T) with many independent rows.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.worker import triton_sampling as ts  # noqa: E402
from pagedllm.worker.sampler import Sampler  # noqa: E402
from pagedllm.worker.sampling_metadata import SamplingMetadata, build_sampling_metadata  # noqa: E402

DEVICE = torch.device("cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without CUDA the Triton kernels run only under TRITON_INTERPRET=1", allow_module_level=True)

NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")
FLT_MAX = torch.finfo(torch.float32).max


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A reproducible fp32 tensor on the test device."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def reference(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """The kernel's contract in PyTorch: the Gumbel-max race with the kernel's uniforms."""
    n, vocab = logits.shape
    u = ts.philox_uniforms(seed, n, vocab, logits.device)
    gumbel = -torch.log(-torch.log(u))
    x = logits.float()
    finite = torch.isfinite(x)
    keys = torch.where(finite, (x / temperature.unsqueeze(1) + gumbel).clamp(min=-FLT_MAX), NEG_INF)
    inf_keys = torch.where(x == POS_INF, gumbel.clamp(min=-FLT_MAX), NEG_INF)
    token = torch.where(keys.amax(-1) > NEG_INF, keys.argmax(-1), 0)
    return torch.where(inf_keys.amax(-1) > NEG_INF, inf_keys.argmax(-1), token)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "rows, vocab, dtype, tiles",
    [
        (5, 1000, torch.float32, {}),
        (4, 1537, torch.bfloat16, {}),
        # Small tiles: several chunks per row, the last one partial, reduced by the second kernel.
        (6, 1537, torch.float32, dict(block_size=128, tiles_per_chunk=3)),
        (3, 1000, torch.bfloat16, dict(block_size=64, tiles_per_chunk=2)),
        (37, 13, torch.float32, {}),  # several rows per program, the last block partial
    ],
)
def test_matches_the_pytorch_race_on_the_same_uniforms(rows: int, vocab: int, dtype: torch.dtype, tiles: dict) -> None:
    logits = randn(rows, vocab, seed=rows, scale=3.0).to(dtype)
    temperature = torch.linspace(0.05, 2.0, rows, device=DEVICE)
    for seed in (0, 1, 16, 2**31 - 2):  # ints Triton would specialise (1, multiples of 16) too
        sampled = ts.gumbel_max_sample(logits, temperature, seed, **tiles)
        assert sampled.dtype == torch.int64 and sampled.device == logits.device
        assert torch.equal(sampled, reference(logits, temperature, seed))


def test_uniforms_are_the_philox_stream_of_each_row_and_lie_in_0_1() -> None:
    u = ts.philox_uniforms(7, 3, 1000, DEVICE)
    assert u.shape == (3, 1000) and bool(((u >= 0) & (u < 1)).all())
    # Row r continues the stream at r * V: one long row is the same numbers.
    assert torch.equal(u.view(-1), ts.philox_uniforms(7, 1, 3000, DEVICE).view(-1))
    assert not torch.equal(u, ts.philox_uniforms(8, 3, 1000, DEVICE))


def test_rows_argument_samples_the_indexed_rows_without_a_copy() -> None:
    logits = randn(7, 300, seed=3, scale=2.0)
    temperature = torch.linspace(0.3, 1.5, 7, device=DEVICE)
    rows = torch.tensor([5, 0, 3], device=DEVICE)
    expected = ts.gumbel_max_sample(logits[rows], temperature[rows], 11)
    assert torch.equal(ts.gumbel_max_sample(logits, temperature, 11, rows), expected)


def test_strided_rows_and_empty_batches() -> None:
    wide = randn(4, 700, seed=4)
    view = wide[:, :500]  # row stride 700, last dim contiguous
    temperature = torch.full((4,), 0.8, device=DEVICE)
    assert torch.equal(ts.gumbel_max_sample(view, temperature, 5), reference(view.contiguous(), temperature, 5))
    empty = ts.gumbel_max_sample(torch.empty(0, 500, device=DEVICE), temperature[:0], 5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


# ---------------------------------------------------------------- distribution


def test_frequencies_match_softmax_and_seeds_differ() -> None:
    num_rows, temperature = 6000, 0.7
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.5], device=DEVICE)
    logits = row.expand(num_rows, -1).contiguous()
    temperatures = torch.full((num_rows,), temperature, device=DEVICE)
    probs = torch.softmax(row / temperature, -1).double().cpu()
    draws = []
    for seed in (123, 124):
        sampled = ts.gumbel_max_sample(logits, temperatures, seed)
        freq = torch.bincount(sampled.cpu(), minlength=6).double() / num_rows
        # 5 sigma of a binomial proportion per token (+1/N so a tiny p still has some slack).
        sigma = (probs * (1 - probs) / num_rows).sqrt()
        assert bool(((freq - probs).abs() <= 5 * sigma + 1.0 / num_rows).all()), (freq, probs)
        draws.append(sampled)
    # Independent draws of this distribution agree on ~35% of rows, not all of them.
    assert (draws[0] == draws[1]).double().mean().item() < 0.6


# ---------------------------------------------------------------- NaN / inf rows


def test_nan_entries_are_never_chosen() -> None:
    num_rows, vocab = 64, 50
    logits = randn(num_rows, vocab, seed=5)
    logits[:, ::3] = NAN  # every third token, including the would-be favourites
    logits[:, 0] = NAN
    logits[0, :] = NAN
    logits[0, 17] = -3.0  # the only finite entry of row 0
    sampled = ts.gumbel_max_sample(logits, torch.full((num_rows,), 1.5, device=DEVICE), 9).cpu()
    assert sampled[0].item() == 17
    assert bool((sampled % 3 != 0).all())
    assert len(set(sampled.tolist())) > 5


def test_inf_rows_draw_uniformly_among_their_inf_entries() -> None:
    num_rows = 200
    logits = randn(num_rows, 40, seed=6, scale=50.0)
    logits[:, [3, 10, 31]] = POS_INF
    logits[:, 5] = NAN
    logits[:, 7] = NEG_INF
    sampled = ts.gumbel_max_sample(logits, torch.full((num_rows,), 0.05, device=DEVICE), 21).cpu()
    counts = torch.bincount(sampled, minlength=40)
    assert counts.sum().item() == counts[[3, 10, 31]].sum().item() == num_rows
    assert bool((counts[[3, 10, 31]] > 30).all())  # ~67 each: uniform, not first-wins


def test_rows_without_a_finite_or_inf_entry_return_token_zero() -> None:
    logits = randn(4, 30, seed=7)
    logits[0] = NEG_INF
    logits[1] = NAN
    logits[2, ::2], logits[2, 1::2] = NEG_INF, NAN
    logits[3] = NEG_INF
    logits[3, 29] = 0.0
    sampled = ts.gumbel_max_sample(logits, torch.ones(4, device=DEVICE), 3, block_size=16, tiles_per_chunk=1)
    assert sampled.tolist() == [0, 0, 0, 29]


@triton.jit
def _keys_kernel(x_ptr, u_ptr, key_ptr, inf_key_ptr, temperature, N: tl.constexpr):
    offs = tl.arange(0, N)
    temps = tl.full((1, N), temperature, tl.float32)
    x = tl.load(x_ptr + offs)[None, :]
    key, inf_key = ts._race_keys(x, tl.load(u_ptr + offs)[None, :], temps)
    tl.store(key_ptr + offs[None, :], key)
    tl.store(inf_key_ptr + offs[None, :], inf_key)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's log(0) and inf - inf, on purpose
def test_a_zero_uniform_gives_no_nan_and_keeps_finite_entries_ahead() -> None:
    # Philox seldom yields U == 0 (2 in 2**32): feed the key function chosen uniforms instead.
    x = torch.tensor([1.0, NEG_INF, NAN, POS_INF, 3.0e38, -5.0, POS_INF, 0.0], device=DEVICE)
    u = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.999], device=DEVICE)
    key, inf_key = torch.empty(8, device=DEVICE), torch.empty(8, device=DEVICE)
    _keys_kernel[(1,)](x, u, key, inf_key, 0.5, N=8)
    assert not bool(key.isnan().any() or inf_key.isnan().any())
    finite = torch.isfinite(x)
    # A finite logit with U == 0 is the lowest finite key, still above every excluded entry.
    assert key[0].item() == -FLT_MAX and bool((key[finite] > NEG_INF).all())
    assert bool((key[~finite] == NEG_INF).all())
    assert inf_key[3].item() == -FLT_MAX and inf_key[6].item() > -FLT_MAX
    assert bool((inf_key[x != POS_INF] == NEG_INF).all())


# ---------------------------------------------------------------- Sampler integration


def sampler_batch(params: list[SamplingParams], vocab: int, generator_seed: int) -> SamplingMetadata:
    """Metadata of `params`; rows with a seed get a fresh generator seeded generator_seed + row."""
    generators = [
        torch.Generator(device=DEVICE).manual_seed(generator_seed + i) if p.seed is not None else None
        for i, p in enumerate(params)
    ]
    n = len(params)
    return build_sampling_metadata(params, [[]] * n, [[]] * n, generators, vocab, DEVICE)


def test_sampler_mixes_greedy_seeded_and_fused_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ts.gumbel_max_sample
    monkeypatch.setattr(ts, "gumbel_max_sample", lambda *a, **k: calls.append(a) or real(*a, **k))
    vocab = 400
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.3, seed=5),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=6),
    ]
    logits = randn(len(params), vocab, seed=8, scale=3.0)
    runs = []
    for use_triton in (True, False, True):
        md = sampler_batch(params, vocab, 100)
        torch.manual_seed(42)
        runs.append(Sampler(use_triton=use_triton).forward(logits.clone(), md).sampled_token_ids.cpu())
    fused, torch_path, again = runs
    assert len(calls) == 2  # once per use_triton=True forward, for the unseeded rows together
    assert fused[[0, 4]].tolist() == logits[[0, 4]].argmax(-1).tolist()
    assert fused[[2, 5]].tolist() == torch_path[[2, 5]].tolist()  # seeded rows: same generators
    assert bool(((fused >= 0) & (fused < vocab)).all())
    assert torch.equal(fused, again)  # torch.manual_seed reproduces the fused rows too
    # The fused rows are the kernel's draws at the seed taken from the default CPU generator.
    torch.manual_seed(42)
    seed = int(torch.randint(2**31 - 1, (1,)).item())
    rows = torch.tensor([1, 3], device=DEVICE)
    assert fused[[1, 3]].tolist() == real(logits, md.temperature, seed, rows).tolist()


def test_sampler_all_random_batch_and_filtered_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ts.gumbel_max_sample
    monkeypatch.setattr(ts, "gumbel_max_sample", lambda *a, **k: calls.append(a) or real(*a, **k))
    logits = randn(3, 300, seed=9, scale=3.0)
    md = sampler_batch([SamplingParams(temperature=0.7)] * 3, 300, 0)
    torch.manual_seed(1)
    sampled = Sampler(use_triton=True).forward(logits.clone(), md).sampled_token_ids
    torch.manual_seed(1)
    seed = int(torch.randint(2**31 - 1, (1,)).item())
    assert len(calls) == 1 and torch.equal(sampled, real(logits, md.temperature, seed))
    # Any top-k / top-p / min-p row keeps the whole batch on the PyTorch path, draws included.
    for filtered in (dict(top_p=0.9), dict(top_k=20), dict(min_p=0.05)):
        params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, **filtered)]
        md = sampler_batch(params, 300, 0)
        results = []
        for use_triton in (True, False):
            torch.manual_seed(3)
            results.append(Sampler(use_triton=use_triton).forward(logits[:2].clone(), md).sampled_token_ids)
        assert torch.equal(results[0], results[1])
    assert len(calls) == 1
