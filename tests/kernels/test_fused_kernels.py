"""Specification of the fused Triton layer kernels, checked against the PyTorch layers.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py), in fp32, on odd shapes: rows
that are not powers of two, strided head views of a fused QKV output, partial rotary, GQA.
The PyTorch implementations (`forward_native`, the CPU path) are the oracle.
"""

from __future__ import annotations


import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from pagedllm.attention.metadata import AttentionMetadata  # noqa: E402
from pagedllm.layers import custom_op  # noqa: E402
from pagedllm.layers import triton_fused as tf  # noqa: E402
from pagedllm.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from pagedllm.layers.layernorm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402
from pagedllm.models.llama import LlamaForCausalLM  # noqa: E402

from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run  # noqa: E402

skip_module_unless_kernels_run()

ATOL = 2e-5  # fp32: the kernels differ from torch only in reduction order and FMA contraction


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A reproducible fp32 tensor on the test device."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def make_norm(hidden: int, eps: float = 1e-6, seed: int = 1) -> RMSNorm:
    """An RMSNorm with a non-trivial weight."""
    norm = RMSNorm(hidden, eps).to(DEVICE)
    norm.weight.data.copy_(randn(hidden, seed=seed))
    return norm


# ---------------------------------------------------------------- RMSNorm (+ residual)


@pytest.mark.parametrize("num_tokens, hidden", [(1, 64), (7, 96), (33, 1000), (3, 4096), (2, 1)])
def test_rms_norm_matches_torch(num_tokens: int, hidden: int) -> None:
    norm = make_norm(hidden, eps=1e-5)
    x = randn(num_tokens, hidden, seed=2, scale=3.0)
    assert (tf.rms_norm(x, norm.weight, 1e-5) - norm.forward_native(x)).abs().max().item() < ATOL


@pytest.mark.parametrize("num_tokens, hidden", [(1, 64), (5, 96), (17, 576), (4, 1536)])
def test_fused_add_rms_norm_returns_norm_and_sum_and_leaves_inputs_alone(num_tokens: int, hidden: int) -> None:
    norm = make_norm(hidden)
    x, residual = randn(num_tokens, hidden, seed=3), randn(num_tokens, hidden, seed=4)
    x_before, residual_before = x.clone(), residual.clone()
    out, residual_out = tf.fused_add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    expected_out, expected_residual = norm.forward_native(x, residual)
    assert torch.equal(residual_out, expected_residual)
    assert (out - expected_out).abs().max().item() < ATOL
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_reads_per_head_views_of_a_fused_qkv_output() -> None:
    # Qwen3's q/k norm: [T, H, D] views whose token stride spans q, k and v.
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 5, 1, 128
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, seed=5)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    norm = make_norm(head_dim)
    out = tf.rms_norm(q, norm.weight, norm.variance_epsilon)
    assert out.shape == q.shape and out.is_contiguous()
    assert (out - norm.forward_native(q)).abs().max().item() < ATOL


def test_rms_norm_handles_non_contiguous_rows_and_empty_batches() -> None:
    norm = make_norm(48)
    x = randn(48, 9, seed=6).t()  # last dim strided: copied first
    assert (tf.rms_norm(x, norm.weight, 1e-6) - norm.forward_native(x)).abs().max().item() < ATOL
    x4 = randn(2, 3, 4, 48, seed=7)  # more than two row levels
    assert (tf.rms_norm(x4, norm.weight, 1e-6) - norm.forward_native(x4)).abs().max().item() < ATOL
    empty = randn(0, 48)
    out, residual_out = tf.fused_add_rms_norm(empty, empty, norm.weight, 1e-6)
    assert out.shape == residual_out.shape == (0, 48)


# ---------------------------------------------------------------- rotary embedding


def make_rotary(head_dim: int, rotary_dim: int, rope_type: str = "default") -> RotaryEmbedding:
    """A rotary layer with a 4096-position table."""
    params: dict = {"rope_theta": 1000000.0, "rope_type": rope_type}
    if rope_type == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=512)
    return RotaryEmbedding(head_dim, rotary_dim, 4096, params).to(DEVICE)


@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (128, 128), (256, 256), (128, 64), (80, 32)])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (5, 5), (16, 8), (3, 1)])
def test_rotary_in_place_matches_torch_on_fused_qkv_views(
    head_dim: int, rotary_dim: int, num_heads: int, num_kv_heads: int
) -> None:
    num_tokens = 7
    rotary = make_rotary(head_dim, rotary_dim, "llama3" if head_dim == 128 else "default")
    positions = torch.tensor([0, 1, 4095, 17, 1000, 2, 3], device=DEVICE)
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, seed=head_dim + num_heads)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    expected_q, expected_k = rotary.forward_native(positions, q.clone(), k.clone())
    tf.rotary_embedding_(positions, q, k, rotary.cos_cache, rotary.sin_cache, rotary_dim)
    assert (q - expected_q).abs().max().item() < ATOL
    assert (k - expected_k).abs().max().item() < ATOL
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)  # the value part is never touched


def test_rotary_with_more_key_heads_than_query_heads_and_no_tokens() -> None:
    rotary = make_rotary(64, 64)
    positions = torch.tensor([3, 9], device=DEVICE)
    q, k = randn(2, 1, 64, seed=8), randn(2, 3, 64, seed=9)
    expected_q, expected_k = rotary.forward_native(positions, q.clone(), k.clone())
    out_q, out_k = rotary.forward_cuda(positions, q, k)
    assert out_q is q and out_k is k
    assert (q - expected_q).abs().max().item() < ATOL and (k - expected_k).abs().max().item() < ATOL
    empty = randn(0, 2, 64)
    tf.rotary_embedding_(positions[:0], empty, empty, rotary.cos_cache, rotary.sin_cache, 64)


# ---------------------------------------------------------------- gated activations


@pytest.mark.parametrize("shape", [(1, 2 * 64), (5, 2 * 100), (3, 2 * 3000), (2, 3, 2 * 33)])
def test_silu_and_mul_matches_torch(shape: tuple[int, ...]) -> None:
    x = randn(*shape, seed=10, scale=4.0)
    assert (tf.silu_and_mul(x) - SiluAndMul().forward_native(x)).abs().max().item() < ATOL


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-2c * 30) -> inf: gelu = -0
@pytest.mark.parametrize("shape", [(1, 2 * 64), (5, 2 * 100), (3, 2 * 3000)])
def test_gelu_tanh_and_mul_matches_torch(shape: tuple[int, ...]) -> None:
    x = randn(*shape, seed=11, scale=4.0)
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -1e-3])  # saturated and near-zero gates
    expected = GeluAndMul("tanh").forward_native(x)
    assert (tf.gelu_tanh_and_mul(x) - expected).abs().max().item() < ATOL * expected.abs().max().item()


def test_silu_and_mul_reads_a_strided_input() -> None:
    x = randn(4, 2 * 50 + 6, seed=12)[:, : 2 * 50]
    assert (tf.silu_and_mul(x) - SiluAndMul().forward_native(x)).abs().max().item() < ATOL


# ---------------------------------------------------------------- dispatch and the off switch


def test_env_var_and_set_fused_kernels_switch_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(custom_op.DISABLE_ENV_VAR, "1")
    assert not RMSNorm(8).use_fused_kernels
    monkeypatch.setenv(custom_op.DISABLE_ENV_VAR, "0")
    model = torch.nn.Sequential(RMSNorm(8), SiluAndMul(), make_rotary(64, 64))
    assert all(m.use_fused_kernels for m in model)
    custom_op.set_fused_kernels(model, False)
    assert not any(m.use_fused_kernels for m in model)
    monkeypatch.setenv(custom_op.DISABLE_ENV_VAR, "1")
    custom_op.set_fused_kernels(model, True)  # the environment wins
    assert not any(m.use_fused_kernels for m in model)


def _tiny_config(model_type: str) -> dict:
    config = dict(
        architectures=["LlamaForCausalLM"], model_type=model_type, vocab_size=97, hidden_size=96,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        rms_norm_eps=1e-6, max_position_embeddings=256, rope_theta=10000.0,
    )
    if model_type == "qwen3":
        config["head_dim"] = 32
    return config


def _prefill_metadata(num_tokens: int, block_size: int = 16) -> AttentionMetadata:
    num_blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        num_actual_tokens=num_tokens, num_decodes=0,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([num_tokens], device=DEVICE),
        slot_mapping=torch.arange(num_tokens, device=DEVICE),
        block_tables=torch.arange(num_blocks, device=DEVICE).view(1, -1),
        max_query_len=num_tokens, max_seq_len=num_tokens,
        query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens],
    )


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_llama_and_qwen3_forward_with_every_fused_layer_matches_torch(
    model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole model through forward_cuda (fused kernels on CPU tensors) equals forward_native."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(_tiny_config(model_type)).eval()
    for name, param in model.named_parameters():
        param.data.normal_(1.0 if "norm" in name else 0.0, 0.1)
    num_tokens = 21
    input_ids = torch.randint(0, 97, (num_tokens,), device=DEVICE)
    positions = torch.arange(num_tokens, device=DEVICE)

    def run() -> torch.Tensor:
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(2, 2, 16, layer.num_kv_heads, layer.head_dim, device=DEVICE)
        with torch.inference_mode():
            return model(input_ids, positions, _prefill_metadata(num_tokens))

    expected = run()
    monkeypatch.setattr(custom_op.CustomOp, "forward",
                        lambda self, *args, **kwargs: self.forward_cuda(*args, **kwargs))
    assert (run() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("num_tokens", [1, 2])
def test_decode_sized_forward_with_norms_and_act_folded_into_the_gemms_matches_torch(
    model_type: str, num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1-2 tokens with the fused path on CPU tensors (behind the layers' switch): add + RMSNorm
    inside the QKV and gate_up skinny GEMMs, the activation inside the down projection."""
    from pagedllm.layers import triton_gemv_norm as tn

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(_tiny_config(model_type)).eval()
    for name, param in model.named_parameters():
        param.data.normal_(1.0 if "norm" in name else 0.0, 0.1)
    input_ids = torch.randint(0, 97, (num_tokens,), device=DEVICE)
    positions = torch.arange(num_tokens, device=DEVICE)

    def run(fused: bool) -> torch.Tensor:
        custom_op.set_fused_kernels(model, fused)
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(2, 2, 16, layer.num_kv_heads, layer.head_dim, device=DEVICE)
        with torch.inference_mode():
            return model(input_ids, positions, _prefill_metadata(num_tokens))

    monkeypatch.setattr(custom_op.CustomOp, "use_fused_path", lambda self, x: self.use_fused_kernels)
    expected = run(False)
    calls: list[int] = []
    real = tn.skinny_add_rmsnorm_linear
    monkeypatch.setattr(tn, "skinny_add_rmsnorm_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert (run(True) - expected).abs().max().item() < 1e-4
    assert len(calls) == 3  # layer 0's gate_up, layer 1's qkv and gate_up (layer 0 has no residual)
