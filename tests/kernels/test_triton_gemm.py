"""Specification of the mid-sized GEMM Triton kernel (layers/triton_gemm.py).

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py) on small odd shapes: M
not a multiple of BLOCK_M, N and K not multiples of the tiles, split-K with ragged and empty
splits, strided x rows. `torch.nn.functional.linear` is the oracle (fp32 within 1e-5 relative;
16-bit against an fp64 reference within the output's rounding).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed")

from pagedllm.layers import triton_gemm as tg  # noqa: E402

DEVICE = torch.device("cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without CUDA the Triton kernels run only under TRITON_INTERPRET=1", allow_module_level=True)

FP32_RTOL = 1e-5
# The decoder linears of Qwen3-0.6B (N, K) and the batch sizes the kernel is for.
QWEN3_SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
MID_MS = [17, 32, 64, 100, 128, 192, 256]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reproducible tensor on the test device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


# (M, N, K, config): tiles that do not divide M, N or K; splits that are ragged (3) or leave
# whole splits empty (K=72 in 16-deep steps over 8 splits: splits 5-7 run no tiles); a grouped
# tile order whose last band is short.
FP32_CASES = [
    (37, 70, 200, tg.GemmConfig(16, 32, 64)),
    (37, 70, 200, tg.GemmConfig(32, 64, 32, split_k=3)),
    (5, 48, 72, tg.GemmConfig(16, 32, 16, split_k=8)),
    (40, 33, 130, tg.GemmConfig(16, 16, 32, split_k=2, group_m=2)),
    (64, 64, 128, tg.GemmConfig(32, 32, 64, split_k=2)),  # every tile full: the unmasked loads
]


@pytest.mark.parametrize("m, n, k, config", FP32_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_f_linear(m: int, n: int, k: int, config: tg.GemmConfig, with_bias: bool) -> None:
    x, weight = randn(m, k, seed=1), randn(n, k, seed=2)
    bias = randn(n, seed=3) if with_bias else None
    out = tg.mid_gemm(x, weight, bias, config=config)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_error(out, F.linear(x, weight, bias)) < FP32_RTOL
    if config.split_k > 1:  # fixed-order reduction: bitwise reproducible
        assert torch.equal(out, tg.mid_gemm(x, weight, bias, config=config))


def test_every_candidate_config_matches() -> None:
    """Whatever the benchmark (or a tuner) picks gives the same result, the default included."""
    m, n, k = 40, 96, 320
    x, weight, bias = randn(m, k, seed=4), randn(n, k, seed=5), randn(n, seed=6)
    expected = F.linear(x, weight, bias)
    configs = tg.candidate_configs(n, k, m, torch.float32, num_sms=132)
    assert any(c.split_k > 1 for c in configs)
    for config in [None, *configs]:
        assert rel_error(tg.mid_gemm(x, weight, bias, config=config), expected) < FP32_RTOL, config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [tg.GemmConfig(16, 32, 64), tg.GemmConfig(32, 32, 32, split_k=3)])
def test_16_bit_within_rounding_of_an_fp32_reference(dtype: torch.dtype, config: tg.GemmConfig) -> None:
    m, n, k = 33, 50, 136
    x, weight, bias = randn(m, k, seed=7, dtype=dtype), randn(n, k, seed=8, dtype=dtype), randn(n, seed=9, dtype=dtype)
    expected = F.linear(x.double(), weight.double(), bias.double())
    out = tg.mid_gemm(x, weight, bias, config=config)
    assert out.dtype == dtype
    # fp32 accumulation: the only error is the output's rounding, under one ulp (2^-7 relative
    # for bf16; the interpreter truncates where the GPU rounds to nearest).
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((out.double() - expected).abs() <= ulp * expected.abs() + 1e-3).all()


@pytest.mark.parametrize("row_stride", [136, 131])  # a multiple of 4 / 8 (vector loads) and not
def test_strided_x_rows_and_out(row_stride: int) -> None:
    m, n, k = 21, 40, 128
    x = randn(m, row_stride, seed=10)[:, :k]
    weight = randn(n, k, seed=11)
    assert x.stride(0) == row_stride
    out = torch.full((m, n), float("nan"), device=DEVICE)
    result = tg.mid_gemm(x, weight, config=tg.GemmConfig(16, 32, 64, split_k=2), out=out)
    assert result is out
    assert rel_error(out, F.linear(x, weight)) < FP32_RTOL


def test_edge_cases_and_bad_inputs() -> None:
    weight, bias = randn(8, 16, seed=12), randn(8, seed=13)
    assert tg.mid_gemm(randn(0, 16), weight).shape == (0, 8)
    assert torch.equal(tg.mid_gemm(randn(3, 0), randn(8, 0), bias), bias.expand(3, 8))
    x = randn(16, 96, seed=14).t()  # [96, 16] with a strided last dim: copied first
    assert rel_error(tg.mid_gemm(x, weight), F.linear(x, weight)) < FP32_RTOL
    with pytest.raises(ValueError, match="contiguous weight"):
        tg.mid_gemm(randn(2, 8), weight.t())
    with pytest.raises(ValueError, match="one dtype"):
        tg.mid_gemm(randn(2, 16, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        tg.mid_gemm(randn(2, 15), weight)
    with pytest.raises(ValueError, match="out as a contiguous"):
        tg.mid_gemm(randn(2, 16), weight, out=torch.empty(8, 2, device=DEVICE).t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_candidates_fill_the_sms_and_fit_shared_memory(dtype: torch.dtype) -> None:
    elem = 4 if dtype == torch.float32 else 2
    for n, k in QWEN3_SHAPES:
        for m in MID_MS:
            configs = tg.candidate_configs(n, k, m, dtype, num_sms=132)
            assert 6 <= len(configs) <= 25 and len(set(configs)) == len(configs), (n, k, m)
            for c in configs:
                assert c.block_m in (16, 32, 64, 128) and c.block_n in (32, 64, 128), c
                assert c.block_k in (64, 128) and c.split_k in (1, 2, 4, 8), c
                assert c.num_warps in (4, 8) and c.num_stages in (3, 4), c
                assert c.smem_bytes(elem) <= tg.SMEM_LIMIT, c
                assert triton.cdiv(k, c.split_k * c.block_k) >= 2, c  # each split >= 2 K steps
            # Some candidate fills at least ~80% of the 132 SMs in one wave or more.
            programs = [triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) * c.split_k for c in configs]
            assert max(programs) >= 0.8 * 132, (n, k, m)
            assert tg.heuristic_config(n, k, m, dtype, 132) == configs[0]


def test_small_n_gets_split_k() -> None:
    # y[256, 1024] = x[256, 2048] @ W^T: 16 tiles of 128 x 128; the candidates split K to fill.
    configs = tg.candidate_configs(1024, 2048, 256, torch.bfloat16, num_sms=132)
    assert any(c.block_m == 128 and c.block_n == 128 and c.split_k == 8 for c in configs)
    assert all(c.block_m in (64, 128) for c in configs)


def test_a_huge_n_still_gets_a_candidate() -> None:
    # An LM head (N = 151936): every tile shape is many waves; the largest one is kept.
    configs = tg.candidate_configs(151936, 1024, 256, torch.bfloat16, num_sms=132)
    assert configs and configs[0].block_m == 128 and configs[0].block_n == 128
