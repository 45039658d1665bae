"""Specification of the skinny-GEMM Triton kernel (layers/triton_gemv.py) and its linear-layer hook.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py) on small odd shapes:
N and K that are not multiples of the tiles, strided x rows, split-K with an empty split.
`torch.nn.functional.linear` is the oracle (fp32 within 1e-5 relative; 16-bit against an
fp32 reference within the output's rounding).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed")

from pagedllm.layers import custom_op, linear  # noqa: E402
from pagedllm.layers import triton_gemv as tg  # noqa: E402
from pagedllm.layers import triton_gemv_norm as tn  # noqa: E402
from pagedllm.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.vocab import ParallelLMHead  # noqa: E402

from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run  # noqa: E402

skip_module_unless_kernels_run()

FP32_RTOL = 1e-5


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reproducible tensor on the test device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp64 on the same inputs."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


# ---------------------------------------------------------------- the kernel


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n, k", [(64, 512), (100, 300), (40, 72), (7, 1000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_f_linear(m: int, n: int, k: int, with_bias: bool) -> None:
    x, weight = randn(m, k, seed=1), randn(n, k, seed=2)
    bias = randn(n, seed=3) if with_bias else None
    out = tg.skinny_linear(x, weight, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_error(out, F.linear(x, weight, bias)) < FP32_RTOL


@pytest.mark.parametrize("m", [1, 2, 7])
def test_every_candidate_config_matches(m: int) -> None:
    """Whatever the tuner picks (tile shapes, split-K, the elementwise path) gives the same result."""
    n, k = 200, 1000  # a small N so the candidates include split-K
    x, weight, bias = randn(m, k, seed=4), randn(n, k, seed=5), randn(n, seed=6)
    expected = F.linear(x, weight, bias)
    configs = tg.candidate_configs(n, k, m, torch.float32, sms=132)
    assert 1 <= len(configs) <= 8
    assert any(c.split_k > 1 for c in configs)
    assert any(not c.use_dot for c in configs) == (m <= 2)
    for config in configs:
        assert rel_error(tg.skinny_linear(x, weight, bias, config=config), expected) < FP32_RTOL, config


@pytest.mark.parametrize("config", [
    tg.GemvConfig(block_n=32, block_k=16, split_k=8),  # K=72: splits of 16, the 5th partial, the rest empty
    tg.GemvConfig(block_n=16, block_k=32, split_k=3),
    tg.GemvConfig(block_n=16, block_k=32, split_k=2, use_dot=False),
])
@pytest.mark.parametrize("m", [1, 2])
def test_split_k_handles_a_ragged_last_tile_and_empty_splits(config: tg.GemvConfig, m: int) -> None:
    n, k = 50, 72
    x, weight, bias = randn(m, k, seed=7), randn(n, k, seed=8), randn(n, seed=9)
    out = tg.skinny_linear(x, weight, bias, config=config)
    assert rel_error(out, F.linear(x, weight, bias)) < FP32_RTOL
    assert torch.equal(out, tg.skinny_linear(x, weight, bias, config=config))  # fixed-order reduction


@pytest.mark.parametrize("row_stride", [264, 259])  # a multiple of 8 (vector loads) and not
@pytest.mark.parametrize("m", [1, 2, 5])
def test_strided_x_rows(row_stride: int, m: int) -> None:
    k, n = 250, 48
    x = randn(m, row_stride, seed=10)[:, :k]
    weight = randn(n, k, seed=11)
    assert x.stride(0) == row_stride
    assert rel_error(tg.skinny_linear(x, weight), F.linear(x, weight)) < FP32_RTOL


def test_transposed_x_is_copied_first() -> None:
    x = randn(96, 3, seed=12).t()  # [3, 96] with a strided last dim
    weight = randn(33, 96, seed=13)
    assert rel_error(tg.skinny_linear(x, weight), F.linear(x, weight)) < FP32_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 16])
def test_16_bit_within_rounding_of_an_fp32_reference(dtype: torch.dtype, m: int) -> None:
    n, k = 96, 520
    x, weight = randn(m, k, seed=14, dtype=dtype), randn(n, k, seed=15, dtype=dtype)
    bias = randn(n, seed=16, dtype=dtype)
    expected = reference(x, weight, bias)
    for config in tg.candidate_configs(n, k, m, dtype, sms=132)[:3] + [tg.GemvConfig(32, 64, 4)]:
        out = tg.skinny_linear(x, weight, bias, config=config)
        assert out.dtype == dtype
        # fp32 accumulation: the only error is the output's rounding, under one ulp (2^-7
        # relative at most for bf16; the interpreter truncates where the GPU rounds to nearest).
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        assert ((out.double() - expected).abs() <= ulp * expected.abs() + 1e-3).all(), config


def test_no_tokens_and_bad_inputs() -> None:
    weight = randn(8, 16, seed=17)
    assert tg.skinny_linear(randn(0, 16), weight).shape == (0, 8)
    with pytest.raises(ValueError, match="at most 16"):
        tg.skinny_linear(randn(17, 16), weight)
    with pytest.raises(ValueError, match="contiguous weight"):
        tg.skinny_linear(randn(2, 8), weight.t())
    with pytest.raises(ValueError, match="one dtype"):
        tg.skinny_linear(randn(2, 16, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match="at most 2 rows"):
        tg.skinny_linear(randn(3, 16), weight, config=tg.GemvConfig(16, 16, use_dot=False))


def test_heuristic_splits_k_only_when_the_n_blocks_leave_sms_idle() -> None:
    big = tg.heuristic_config(6144, 4096, 1, torch.bfloat16, sms=132)  # 192 blocks of 32 columns
    assert (big.block_n, big.block_k, big.split_k, big.use_dot) == (32, 256, 1, True)
    small = tg.heuristic_config(1024, 2048, 1, torch.bfloat16, sms=132)  # 32 blocks: split to 128
    assert small.split_k == 4
    fp32 = tg.heuristic_config(6144, 4096, 1, torch.float32, sms=132)
    assert fp32.block_k == 128  # the same bytes per tile


# ---------------------------------------------------------------- gated input (act folded in)


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """The unfused activation: act(gate) * up over x = [gate | up] (the PyTorch layers' numerics)."""
    gate, up = x.chunk(2, dim=-1)
    gated = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return gated * up


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("n, k", [(64, 512), (50, 72), (7, 1000)])
def test_gated_input_matches_the_activation_then_f_linear(act: str, m: int, n: int, k: int) -> None:
    x, weight, bias = randn(m, 2 * k, seed=30, dtype=torch.float32) * 2, randn(n, k, seed=31), randn(n, seed=32)
    expected = F.linear(act_and_mul(x, act), weight, bias)
    configs = tg.candidate_configs(n, k, m, torch.float32, sms=132) + [
        tg.GemvConfig(block_n=16, block_k=32, split_k=3),
        tg.GemvConfig(block_n=16, block_k=32, split_k=2, use_dot=m > 2),
        tg.CUBLAS,  # the tuner's baseline: the activation kernel, then the matmul
    ]
    for config in [None, *configs]:
        out = tg.skinny_linear(x, weight, bias, config=config, act=act)
        assert out.shape == (m, n)
        assert rel_error(out, expected) < FP32_RTOL, config


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 2, 16])
def test_gated_input_16_bit_within_rounding_of_an_fp32_reference(act: str, m: int) -> None:
    n, k = 96, 520
    x, weight = randn(m, 2 * k, seed=33, dtype=torch.bfloat16), randn(n, k, seed=34, dtype=torch.bfloat16)
    # The reference rounds act(gate) * up to bf16 as the unfused layers do, then multiplies in fp64.
    expected = F.linear(act_and_mul(x, act).double(), weight.double())
    for config in tg.candidate_configs(n, k, m, torch.bfloat16, sms=132)[:3] + [tg.GemvConfig(32, 64, 4)]:
        out = tg.skinny_linear(x, weight, config=config, act=act)
        assert out.dtype == torch.bfloat16
        # The output's rounding, plus the gated value's (the interpreter truncates where torch
        # rounds to nearest: a few elements may differ by one bf16 ulp).
        assert rel_error(out, expected) < 2.0 ** -6, config


def test_gated_input_checks_its_shape() -> None:
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        tg.skinny_linear(randn(1, 16), randn(8, 16), act="silu")
    with pytest.raises(ValueError, match="act must be"):
        tg.skinny_linear(randn(1, 32), randn(8, 16), act="relu")


# ---------------------------------------------------------------- the linear-layer hook


@pytest.fixture
def fused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path for CPU tensors (the interpreter), still behind the layers' switch."""
    monkeypatch.setattr(custom_op.CustomOp, "use_fused_path", lambda self, x: self.use_fused_kernels)


def _filled(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for param in layer.parameters():
        param.data.copy_(torch.randn(param.shape, generator=gen))
    return layer.to(DEVICE)


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = tg.skinny_linear

    def spy(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(tg, "skinny_linear", spy)
    return calls


@pytest.mark.parametrize("make", [
    lambda: ColumnParallelLinear(72, 100, bias=True),
    lambda: MergedColumnParallelLinear(72, [40, 40]),
    lambda: QKVParallelLinear(72, 8, 6, 2, bias=True),
    lambda: RowParallelLinear(72, 50, bias=True),
])
@pytest.mark.parametrize("shape", [(1, 72), (2, 3, 72), (20, 72)])
def test_layers_give_the_same_output_with_fused_kernels_on_and_off(
    make, shape: tuple[int, ...], fused_on_cpu: None, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    layer = _filled(make(), seed=18)
    x = randn(*shape, seed=19)
    calls = _count_kernel_calls(monkeypatch)
    custom_op.set_fused_kernels(layer, False)
    expected = layer(x)
    assert calls == []
    custom_op.set_fused_kernels(layer, True)
    out = layer(x)
    tokens = x.numel() // x.shape[-1]
    assert calls == ([tokens] if tokens <= linear.SKINNY_MAX_TOKENS else [])  # 20 tokens: F.linear
    assert out.shape == expected.shape
    assert rel_error(out, expected) < FP32_RTOL


def test_row_parallel_adds_its_bias_once_after_the_all_reduce(fused_on_cpu: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Two ranks holding the same shard: the all-reduce doubles the partial sums, not the bias.
    monkeypatch.setattr(linear, "tensor_model_parallel_all_reduce", lambda t: 2 * t)
    layer = _filled(RowParallelLinear(64, 24, bias=True), seed=20)
    x = randn(3, 64, seed=21)
    expected = 2 * F.linear(x, layer.weight) + layer.bias
    assert rel_error(layer(x), expected) < FP32_RTOL
    assert rel_error(layer.forward_native(x), expected) < FP32_RTOL


def test_lm_head_uses_the_kernel_for_few_rows_behind_the_switch(fused_on_cpu: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    head = _filled(ParallelLMHead(97, 64), seed=22)
    hidden = randn(4, 64, seed=23)
    calls = _count_kernel_calls(monkeypatch)
    expected = F.linear(hidden, head.weight)
    assert rel_error(head.compute_logits(hidden), expected) < FP32_RTOL
    assert calls == [4]
    custom_op.set_fused_kernels(head, False)
    assert torch.equal(head.compute_logits(hidden), expected)
    assert calls == [4]


def test_other_weights_fall_back_to_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_kernel_calls(monkeypatch)
    x = randn(2, 32, seed=24)
    weight = randn(32, 16, seed=25).t()  # not contiguous
    assert torch.equal(linear.fused_linear(x, weight), F.linear(x, weight))
    x64, weight64 = x.double(), weight.double().contiguous()
    assert torch.equal(linear.fused_linear(x64, weight64), F.linear(x64, weight64))  # fp64 is not served
    assert calls == []


def test_env_var_turns_the_linear_layers_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(custom_op.DISABLE_ENV_VAR, "1")
    assert not RowParallelLinear(8, 8).use_fused_kernels
    assert not ParallelLMHead(10, 8).use_fused_kernels
    monkeypatch.setenv(custom_op.DISABLE_ENV_VAR, "0")
    model = torch.nn.Sequential(ColumnParallelLinear(8, 8), RowParallelLinear(8, 8), ParallelLMHead(10, 8))
    custom_op.set_fused_kernels(model, False)
    assert not any(m.use_fused_kernels for m in model)


def _gated_calls(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Spy on skinny_linear: the `act` of each call (None for a plain GEMM)."""
    calls: list[str | None] = []
    real = tg.skinny_linear

    def spy(*args, act: str | None = None, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        calls.append(act)
        return real(*args, act=act, **kwargs)

    monkeypatch.setattr(tg, "skinny_linear", spy)
    return calls


@pytest.mark.parametrize("act, fused_act", [
    (None, "silu"),  # LlamaMLP's own SiluAndMul
    ("tanh", "gelu_tanh"),  # Gemma's GeGLU
    ("none", None),  # exact GELU has no fused kernel: the unfused pair
])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 20])
def test_llama_mlp_folds_the_activation_into_the_down_projection(
    act: str | None, fused_act: str | None, num_tokens: int, fused_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pagedllm.layers.activation import GeluAndMul
    from pagedllm.models.llama import LlamaMLP

    config = dict(hidden_size=72, intermediate_size=88)
    mlp = _filled(LlamaMLP(config, act=None if act is None else GeluAndMul(act)), seed=40)
    x = randn(num_tokens, 72, seed=41)
    custom_op.set_fused_kernels(mlp, False)
    expected = mlp(x)
    calls = _gated_calls(monkeypatch)
    custom_op.set_fused_kernels(mlp, True)
    out = mlp(x)
    if num_tokens > linear.SKINNY_MAX_TOKENS:
        assert calls == []
    else:
        assert calls == [None, fused_act]  # gate_up, then down (gated when the act is fusable)
    assert rel_error(out, expected) < FP32_RTOL
    linear.set_skinny_gemm(mlp, False)  # the skinny GEMM off: the unfused activation again
    calls.clear()
    assert rel_error(mlp(x), expected) < FP32_RTOL and calls == []


def test_gated_down_projection_splits_each_tensor_parallel_shard_at_its_own_gate_and_up(
    fused_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TP=2 emulated: each rank's [gate shard | up shard] times its down-projection columns,
    summed over ranks (the all-reduce), equals the unsharded MLP."""
    from pagedllm.models.llama import LlamaMLP

    hidden, inter, tp = 48, 64, 2
    full = _filled(LlamaMLP(dict(hidden_size=hidden, intermediate_size=inter)), seed=42)
    x = randn(2, hidden, seed=43)
    custom_op.set_fused_kernels(full, False)
    expected = full(x)
    monkeypatch.setattr(linear, "get_tp_size", lambda: tp)
    calls = _gated_calls(monkeypatch)
    total = torch.zeros_like(expected)
    gate_w, up_w = full.gate_up_proj.weight.chunk(2, dim=0)
    for rank in range(tp):
        monkeypatch.setattr(linear, "get_tp_rank", lambda rank=rank: rank)
        shard = LlamaMLP(dict(hidden_size=hidden, intermediate_size=inter)).to(DEVICE)
        loader = shard.gate_up_proj.weight_loader
        loader(shard.gate_up_proj.weight, gate_w, 0)
        loader(shard.gate_up_proj.weight, up_w, 1)
        shard.down_proj.weight_loader(shard.down_proj.weight, full.down_proj.weight)
        total += shard(x)
    assert calls == [None, "silu"] * tp
    assert rel_error(total, expected) < FP32_RTOL


@pytest.mark.parametrize("num_tokens", [1, 2, 5])
def test_llama_few_token_forward_and_logits_match_with_the_kernel(num_tokens: int, fused_on_cpu: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Llama over 1-5 tokens: every linear layer and the LM head through the kernel, the
    MLP's activation inside the down projection."""
    from pagedllm.attention.metadata import AttentionMetadata
    from pagedllm.models.llama import LlamaForCausalLM

    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=97, hidden_size=96,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        rms_norm_eps=1e-6, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).eval()
    for name, param in model.named_parameters():
        param.data.normal_(1.0 if "norm" in name else 0.0, 0.1)
    input_ids = torch.randint(0, 97, (num_tokens,), device=DEVICE)
    positions = torch.arange(num_tokens, device=DEVICE)
    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens, num_decodes=0,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([num_tokens], device=DEVICE), slot_mapping=torch.arange(num_tokens, device=DEVICE),
        block_tables=torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
        max_query_len=num_tokens, max_seq_len=num_tokens, query_start_loc_cpu=[0, num_tokens],
        seq_lens_cpu=[num_tokens],
    )

    def logits(fused: bool) -> torch.Tensor:
        custom_op.set_fused_kernels(model, fused)
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(2, 1, 16, layer.num_kv_heads, layer.head_dim, device=DEVICE)
        with torch.inference_mode():
            return model.compute_logits(model(input_ids, positions, metadata))

    expected = logits(False)
    calls = _count_kernel_calls(monkeypatch)
    norm_calls = _count_norm_kernel_calls(monkeypatch)
    out = logits(True)
    # Layer 0 (no residual yet): qkv, o, down; layer 1: o, down; the LM head. The add + RMSNorm
    # kernels: layer 0's gate_up, layer 1's qkv and gate_up.
    assert len(calls) == 3 + 2 + 1 and len(norm_calls) == 3
    assert (out - expected).abs().max().item() < 1e-4


def _count_norm_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = tn.skinny_add_rmsnorm_linear

    def spy(hidden: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(tn, "skinny_add_rmsnorm_linear", spy)
    return calls


# ---------------------------------------------------------------- add + RMSNorm folded in


def _norm_reference(hidden: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    from pagedllm.layers.layernorm import RMSNorm

    norm = RMSNorm(hidden.shape[1], eps).to(DEVICE, hidden.dtype)
    norm.weight.data.copy_(norm_weight)
    normed, summed = norm.forward_native(hidden, residual)
    return F.linear(normed, weight, bias), summed


@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("n, k", [(64, 512), (50, 72), (7, 1000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_add_rmsnorm_linear_matches_the_norm_then_f_linear(m: int, n: int, k: int, with_bias: bool) -> None:
    hidden, residual = randn(m, k, seed=50), randn(m, k, seed=51) * 3
    norm_weight, weight = randn(k, seed=52), randn(n, k, seed=53)
    bias = randn(n, seed=54) if with_bias else None
    expected, expected_residual = _norm_reference(hidden, residual, norm_weight, weight, bias)
    before = hidden.clone(), residual.clone()
    for config in [None, *tn.norm_candidate_configs(n, k, m, torch.float32, sms=132), tg.CUBLAS]:
        out, residual_out = tn.skinny_add_rmsnorm_linear(hidden, residual, norm_weight, 1e-6, weight, bias,
                                                         config=config)
        assert torch.equal(residual_out, expected_residual), config
        assert rel_error(out, expected) < FP32_RTOL, config
    assert torch.equal(hidden, before[0]) and torch.equal(residual, before[1])


@pytest.mark.parametrize("m", [1, 2, 16])
def test_add_rmsnorm_linear_16_bit_within_rounding(m: int) -> None:
    n, k = 96, 520
    hidden, residual = randn(m, k, seed=55, dtype=torch.bfloat16), randn(m, k, seed=56, dtype=torch.bfloat16)
    norm_weight, weight = randn(k, seed=57, dtype=torch.bfloat16), randn(n, k, seed=58, dtype=torch.bfloat16)
    summed = hidden + residual
    # fp64 reference of the exact math on the rounded sum (both paths round differently from it).
    s = summed.double()
    expected = F.linear(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight.double(),
                        weight.double())
    for config in tn.norm_candidate_configs(n, k, m, torch.bfloat16, sms=132)[:3]:
        out, residual_out = tn.skinny_add_rmsnorm_linear(hidden, residual, norm_weight, 1e-6, weight, config=config)
        assert out.dtype == torch.bfloat16
        if DEVICE.type == "cuda":
            assert torch.equal(residual_out, summed), config
        else:  # the interpreter truncates to bf16 where torch rounds to nearest: one ulp apart
            torch.testing.assert_close(residual_out, summed, rtol=2.0 ** -7, atol=0)
        assert rel_error(out, expected) < 2.0 ** -6, config


def test_add_rmsnorm_linear_rejects_split_k_and_bad_shapes() -> None:
    hidden, weight = randn(1, 32), randn(8, 32)
    with pytest.raises(ValueError, match="split-K"):
        tn.skinny_add_rmsnorm_linear(hidden, hidden, randn(32), 1e-6, weight, config=tg.GemvConfig(16, 16, 2))
    with pytest.raises(ValueError, match="norm weight"):
        tn.skinny_add_rmsnorm_linear(hidden, hidden, randn(16), 1e-6, weight)


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_cublas_choice_is_f_linear(with_bias: bool) -> None:
    # The tuner keeps cuBLAS unless a Triton config is clearly faster; that choice must be F.linear.
    torch.manual_seed(0)
    x, weight = torch.randn(3, 40), torch.randn(24, 40)
    bias = torch.randn(24) if with_bias else None
    out = tg.skinny_linear(x, weight, bias, config=tg.CUBLAS)
    torch.testing.assert_close(out, F.linear(x, weight, bias))
