"""Specification of the fused Gumbel-max sampling kernel and its use by the Sampler.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py). The oracle for exactness is
argmax(logits / T - log(-log(U))) in PyTorch with the kernel's own uniforms (`philox_uniforms`),
which are checked against a NumPy Philox4x32-10; the distribution is checked against
softmax(logits / T) with many independent rows.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.worker import triton_sampling as ts  # noqa: E402
from pagedllm.worker.sampler import Sampler, sample_greedy  # noqa: E402
from pagedllm.worker.sampling_metadata import SamplingMetadata, build_sampling_metadata  # noqa: E402

from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run  # noqa: E402

skip_module_unless_kernels_run()

NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")
FLT_MAX = torch.finfo(torch.float32).max


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A reproducible fp32 tensor on the test device."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def philox4x32_10(seed: int, counters: np.ndarray) -> np.ndarray:
    """[n, 4] uint32: Triton's Philox4x32-10 (tl.randint4x) of 64-bit counters, in NumPy.

    State (low word, high word, 0, 0) of each counter, key (seed low, seed high word).
    """
    mask = np.uint64(0xFFFFFFFF)
    counters = counters.astype(np.uint64)
    c0, c1 = counters & mask, counters >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32 & 0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # < 2**64: exact
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def uniforms_in_numpy(seed: int, n_rows: int, vocab: int) -> torch.Tensor:
    """The documented U: token i of row r is component i % 4 of Philox(r * ceil(V / 4) + i // 4)."""
    groups = -(-vocab // 4)
    bits = philox4x32_10(seed, np.arange(n_rows * groups)).view(np.int32)
    bits = np.where(bits < 0, ~bits, bits)  # tl.rand's map onto [0, 2**31)
    u = bits.astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(u.reshape(n_rows, groups * 4)[:, :vocab].copy())


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
        # V < 4: a tile is one Philox group (4 tokens, the rest masked), 16 rows a program.
        (70, 3, torch.float32, dict(block_size=64)),
        (5, 2, torch.bfloat16, {}),
        (3, 1, torch.float32, {}),
        (7, 4098, torch.float32, {}),  # V % 4 == 2, several chunks of 8192 / tiles of 1024
    ],
)
def test_matches_the_pytorch_race_on_the_same_uniforms(rows: int, vocab: int, dtype: torch.dtype, tiles: dict) -> None:
    logits = randn(rows, vocab, seed=rows, scale=3.0).to(dtype)
    temperature = torch.linspace(0.05, 2.0, rows, device=DEVICE)
    for seed in (0, 1, 16, 2**31 - 2):  # ints Triton would specialise (1, multiples of 16) too
        sampled = ts.gumbel_max_sample(logits, temperature, seed, **tiles)
        assert sampled.dtype == torch.int64 and sampled.device == logits.device
        assert torch.equal(sampled, reference(logits, temperature, seed))


@pytest.mark.parametrize("n_rows, vocab", [(3, 1000), (3, 1537), (5, 3), (2, 1), (2, 4100)])
@pytest.mark.parametrize("seed", [7, 2**40 + 5])
def test_uniforms_are_four_per_philox_counter_row_by_row(n_rows: int, vocab: int, seed: int) -> None:
    u = ts.philox_uniforms(seed, n_rows, vocab, DEVICE)
    assert u.shape == (n_rows, vocab) and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u.cpu(), uniforms_in_numpy(seed, n_rows, vocab))
    # Row r starts at counter r * ceil(V / 4): rows are one long row cut every 4 * ceil(V / 4).
    groups = -(-vocab // 4)
    long_row = ts.philox_uniforms(seed, 1, n_rows * groups * 4, DEVICE).view(n_rows, groups * 4)
    assert torch.equal(u, long_row[:, :vocab])
    assert not torch.equal(u, ts.philox_uniforms(seed + 1, n_rows, vocab, DEVICE))


@triton.jit
def _rand_kernel(out_ptr, seed, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.rand(seed, offs.to(tl.int64)))


def test_component_zero_is_tl_rand_of_the_counter() -> None:
    # tl.rand uses component 0 of the same Philox: the other three map to [0, 1) the same way.
    rand = torch.empty(256, device=DEVICE)
    _rand_kernel[(1,)](rand, 11, N=256)
    assert torch.equal(ts.philox_uniforms(11, 1, 1024, DEVICE)[0, ::4], rand)


@triton.jit
def _log_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, ts._log(tl.load(x_ptr + offs)))


def test_the_written_out_log_is_within_one_ulp_where_the_race_uses_it() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(0, 2**31, 4096).astype(np.float32) * np.float32(4.6566127342e-10),  # U
        np.float32(1) - np.arange(1, 4097, dtype=np.float32) * np.float32(2**-24),  # U next to 1
        np.float32(4.6566127342e-10) * np.arange(1, 4097, dtype=np.float32),  # small U
        np.exp(rng.uniform(np.log(2**-24), np.log(21.5), 4096)).astype(np.float32),  # -log(U)
    ])
    x = np.where(x > 0, x, np.float32(0.5))  # U == 0 never reaches _log (the race masks it)
    y = torch.empty(len(x), device=DEVICE)
    _log_kernel[(1,)](torch.from_numpy(x).to(DEVICE), y, N=len(x))
    exact = np.log(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)  # of the fp32 result
    assert (np.abs(y.cpu().numpy() - exact) / ulp).max() < 1.0


def test_rows_argument_samples_the_indexed_rows_without_a_copy() -> None:
    logits = randn(7, 300, seed=3, scale=2.0)
    temperature = torch.linspace(0.3, 1.5, 7, device=DEVICE)
    rows = torch.tensor([5, 0, 3], device=DEVICE)
    expected = ts.gumbel_max_sample(logits[rows], temperature[rows], 11)
    assert torch.equal(ts.gumbel_max_sample(logits, temperature, 11, rows), expected)


@pytest.mark.parametrize("stride", [700, 701])  # a multiple of 4 (vector loads) or not
def test_strided_rows_and_empty_batches(stride: int) -> None:
    wide = randn(4, stride, seed=4)
    view = wide[:, :500]  # last dim contiguous
    temperature = torch.full((4,), 0.8, device=DEVICE)
    assert torch.equal(ts.gumbel_max_sample(view, temperature, 5), reference(view.contiguous(), temperature, 5))
    empty = ts.gumbel_max_sample(torch.empty(0, 500, device=DEVICE), temperature[:0], 5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError, match="power of two"):
        ts.gumbel_max_sample(view, temperature, 5, block_size=2)  # a tile holds whole Philox groups


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


# Small tiles: +inf in the first two chunks of 16 tokens, none in the third (no second pass there).
@pytest.mark.parametrize("num_rows, tiles", [(200, {}), (30, dict(block_size=16, tiles_per_chunk=1))])
def test_inf_rows_draw_uniformly_among_their_inf_entries(num_rows: int, tiles: dict) -> None:
    logits = randn(num_rows, 40, seed=6, scale=50.0)
    logits[:, [3, 10, 31]] = POS_INF
    logits[:, 5] = NAN
    logits[:, 7] = NEG_INF
    logits[-1, [3, 10, 31]] = 0.0  # one row without +inf: its finite race still counts
    temperature = torch.full((num_rows,), 0.05, device=DEVICE)
    sampled = ts.gumbel_max_sample(logits, temperature, 21, **tiles)
    assert torch.equal(sampled, reference(logits, temperature, 21))
    sampled = sampled[:-1].cpu()
    counts = torch.bincount(sampled, minlength=40)
    assert counts.sum().item() == counts[[3, 10, 31]].sum().item() == num_rows - 1
    assert bool((counts[[3, 10, 31]] > num_rows // 7).all())  # ~1/3 each: uniform, not first-wins


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


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf, on purpose
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


def sampler(use_triton: bool) -> Sampler:
    """A Sampler that also runs the kernel on CPU tensors (the interpreter) when told to use it."""
    s = Sampler(use_triton=use_triton)
    s.triton_on_cpu = True  # the Sampler's switch for the interpreter; ignored on CUDA
    return s


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
        runs.append(sampler(use_triton).forward(logits.clone(), md).sampled_token_ids.cpu())
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
    sampled = sampler(True).forward(logits.clone(), md).sampled_token_ids
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
            results.append(sampler(use_triton).forward(logits[:2].clone(), md).sampled_token_ids)
        assert torch.equal(results[0], results[1])
    assert len(calls) == 1


# ---------------------------------------------------------------- greedy


def greedy_oracle(logits: torch.Tensor) -> torch.Tensor:
    """sample_greedy's tokens two ways (its CUDA path: NaN -> -inf then argmax; its CPU path),
    checked equal: the oracle of greedy_sample."""
    cuda_path = torch.nan_to_num(logits.float(), nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF).argmax(-1)
    cpu_path = sample_greedy(logits.cpu().clone())
    assert torch.equal(cuda_path.cpu(), cpu_path)
    return cuda_path


# (block_size, tiles_per_chunk): the defaults, one tile per chunk, and several tiles per chunk
# with the last chunk partial (1000 = 15 tiles of 64 + 40; 4099 tokens in tiles of 256).
GREEDY_TILES = [{}, dict(block_size=64, tiles_per_chunk=1), dict(block_size=64, tiles_per_chunk=4),
                dict(block_size=256, tiles_per_chunk=3)]


@pytest.mark.parametrize("tiles", GREEDY_TILES)
@pytest.mark.parametrize(
    "rows, vocab, dtype",
    [(3, 1000, torch.float32), (2, 4099, torch.bfloat16), (4, 1537, torch.float16), (5, 5000, torch.float32)],
)
def test_greedy_is_torch_argmax_on_random_rows(rows: int, vocab: int, dtype: torch.dtype, tiles: dict) -> None:
    logits = randn(rows, vocab, seed=vocab + rows, scale=3.0).to(dtype)
    sampled = ts.greedy_sample(logits, **tiles)
    assert sampled.dtype == torch.int64 and sampled.device == logits.device
    assert torch.equal(sampled, logits.argmax(-1))


@pytest.mark.parametrize("tiles", GREEDY_TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ties_go_to_the_first_index(dtype: torch.dtype, tiles: dict) -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randint(-3, 4, (8, 1003), generator=gen).float()  # ~140 tied maxima a row
    logits[1] = 2.0  # all tied: token 0
    logits[2, :] = -1.0
    logits[2, [517, 900, 1002]] = 5.0  # tied maxima in different chunks and tiles
    logits[3, :] = 0.0
    logits[3, :600] = -0.0  # -0.0 == 0.0: still token 0
    logits[4, :] = -2.0
    logits[4, [1002, 64, 65]] = 7.0  # the lowest id, not the first written
    logits[5, :] = -2.0
    logits[5, 1002] = 1.0  # the last token, in the partial last tile
    logits[6, :] = torch.finfo(torch.bfloat16).min  # the lowest finite value everywhere
    logits = logits.to(dtype).to(DEVICE)
    sampled = ts.greedy_sample(logits, **tiles)
    assert torch.equal(sampled, logits.argmax(-1))
    assert sampled[1:7].tolist() == [0, 517, 0, 64, 1002, 0]


@pytest.mark.parametrize("tiles", GREEDY_TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_nan_inf_and_dead_rows_match_sample_greedy(dtype: torch.dtype, tiles: dict) -> None:
    logits = randn(10, 1001, seed=12, scale=4.0)
    logits[0, logits[0].argmax()] = NAN  # the would-be maximum is NaN: the runner-up wins
    logits[1, ::3] = NAN
    logits[1, 0] = NAN
    logits[2] = NAN  # all NaN: token 0
    logits[3] = NEG_INF  # all -inf: token 0
    logits[4, ::2], logits[4, 1::2] = NEG_INF, NAN  # nothing finite: token 0
    logits[5, [700, 90, 999]] = POS_INF  # the first +inf
    logits[5, :90] = NAN
    logits[6] = NAN
    logits[6, 998] = -3.0  # the only finite entry, NaN all around
    logits[7] = NEG_INF
    logits[7, 1000] = NEG_INF  # (still nothing) ...
    logits[7, 640] = -1e30  # ... but one finite value in a later chunk
    logits[8, :] = POS_INF  # all +inf: token 0
    logits[9, 0] = NAN
    logits[9, 1] = POS_INF  # NaN first, then +inf
    logits = logits.to(dtype)
    sampled = ts.greedy_sample(logits, **tiles)
    expected = greedy_oracle(logits)
    assert torch.equal(sampled, expected)
    assert sampled[2:10].tolist() == [0, 0, 0, 90, 998, 640, 0, 1]
    live = [0, 1, 5, 6, 7, 9]  # rows with a finite or +inf entry never get a NaN token
    assert not bool(logits.float()[live].gather(1, sampled[live].unsqueeze(1)).isnan().any())


@pytest.mark.parametrize(
    "rows, vocab, tiles",
    [(37, 13, {}), (70, 3, dict(block_size=64)), (5, 1, {}), (9, 2, {}), (33, 200, dict(block_size=256))],
)
def test_greedy_several_rows_per_program(rows: int, vocab: int, tiles: dict) -> None:
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randint(0, 3, (rows, vocab), generator=gen).float().to(DEVICE)  # ties
    logits[::5, vocab // 2] = NAN
    logits[3::7] = NEG_INF
    assert torch.equal(ts.greedy_sample(logits, **tiles), greedy_oracle(logits))


def test_greedy_chunks_sized_by_the_batch_give_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = randn(6, 2000, seed=13).to(torch.bfloat16)
    logits[:, 1999] = logits.amax(-1)  # a tie with the last token
    expected = logits.argmax(-1)
    for programs in (1, 6, 40, 2048):  # chunks of 8, 8, 2 and 1 tiles of 64
        monkeypatch.setattr(ts, "_GREEDY_PROGRAMS", programs)
        assert torch.equal(ts.greedy_sample(logits, block_size=64), expected)


@pytest.mark.parametrize("stride", [1008, 1009])  # rows 16-byte aligned for bf16 (vector loads) or not
def test_greedy_strided_rows_empty_batches_and_bad_input(stride: int) -> None:
    wide = randn(5, stride, seed=14).to(torch.bfloat16)
    view = wide[:, :1000]
    view[2, 999] = 100.0  # the maximum on the last token (of the last vector when aligned)
    assert torch.equal(ts.greedy_sample(view), view.argmax(-1))
    assert torch.equal(ts.greedy_sample(view, block_size=128, tiles_per_chunk=2), view.argmax(-1))
    empty = ts.greedy_sample(torch.empty(0, 1000, device=DEVICE))
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError, match="power of two"):
        ts.greedy_sample(view, block_size=48)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        ts.greedy_sample(view.double())


def count_greedy_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    real = ts.greedy_sample
    monkeypatch.setattr(ts, "greedy_sample", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_greedy_rows_take_the_same_tokens_with_triton(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_greedy_calls(monkeypatch)
    vocab = 1537
    logits = randn(6, vocab, seed=15, scale=3.0)
    logits[1, 17] = NAN
    logits[1, logits[1].argmax()] = NAN
    logits[2] = NAN
    logits[3, [900, 40]] = POS_INF
    logits[4] = NEG_INF
    logits[5] = torch.randint(0, 2, (vocab,), generator=torch.Generator().manual_seed(5)).float()
    logits = logits.to(dtype)
    greedy = [SamplingParams(temperature=0.0)] * 6
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8), SamplingParams(temperature=0.0),
             SamplingParams(temperature=0.0, seed=3), SamplingParams(temperature=0.7, top_p=0.9),
             SamplingParams(temperature=0.0)]
    with_logprobs = [SamplingParams(temperature=0.0, logprobs=2)] * 6
    penalised = [SamplingParams(temperature=0.0, presence_penalty=0.5)] * 6  # the fp32 general path
    for params in (greedy, mixed, with_logprobs, penalised):
        outs = []
        for use_triton in (True, False):
            md = sampler_batch(params, vocab, 7)
            torch.manual_seed(0)
            outs.append(sampler(use_triton).forward(logits.clone(), md))
        fused, torch_path = outs
        assert torch.equal(fused.sampled_token_ids, torch_path.sampled_token_ids)
        assert fused.logprobs == torch_path.logprobs
        greedy_rows = [i for i, p in enumerate(params) if p.temperature == 0.0 and p.seed is None]
        expected = greedy_oracle(logits)
        assert fused.sampled_token_ids[greedy_rows].tolist() == expected[greedy_rows].tolist()
    assert len(calls) == 4  # once per use_triton=True forward
    # Without the interpreter switch, CPU logits stay on the PyTorch path.
    if DEVICE.type == "cpu":
        md = sampler_batch(greedy, vocab, 7)
        Sampler(use_triton=True).forward(logits.clone(), md)
        assert len(calls) == 4
