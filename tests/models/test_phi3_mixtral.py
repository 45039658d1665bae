"""Phi-3, Mixtral and Qwen3-MoE: greedy ids equal Hugging Face's (also preempted / chunked), logprobs match."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedllm import LLM
from tests.models.tiny_models import (
    assert_greedy_logprobs_match_hf,
    build_tiny_model,
    engine_greedy,
    hf_greedy,
    random_prompts,
)

MAX_NEW_TOKENS = 16

# architecture -> fields added to the shared tiny shape (LM heads untied)
CONFIGS: dict[str, dict[str, Any]] = {
    "Phi3ForCausalLM": dict(partial_rotary_factor=0.5, sliding_window=None, hidden_act="silu", tie_word_embeddings=False),
    "MixtralForCausalLM": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False),
    "Qwen3MoeForCausalLM": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False),
}


def _prompts() -> list[list[int]]:
    return random_prompts([1, 3, 8, 16, 17, 24, 33, 48], seed=0)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    """(model dir, HF model, HF greedy outputs for the shared prompts) for one architecture."""
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model = build_tiny_model(request.param, path, configs=CONFIGS)
    return path, hf_model, hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)


def _generate(path: str, expect_preemption: bool = False, **engine_args) -> list[list[int]]:
    return engine_greedy(path, _prompts(), MAX_NEW_TOKENS, expect_preemption, **engine_args)


def test_greedy_matches_hf(tiny):
    path, _, expected = tiny
    assert _generate(path) == expected


def test_greedy_matches_hf_under_preemption(tiny):
    path, _, expected = tiny
    # 5 blocks of 16 tokens: one 64-token sequence fits, eight together do not.
    assert _generate(path, expect_preemption=True, num_gpu_blocks_override=5, max_model_len=80) == expected


def test_greedy_matches_hf_with_every_prompt_chunked(tiny):
    path, _, expected = tiny
    assert _generate(path, max_num_batched_tokens=7) == expected


def test_logprobs_match_hf_fp32(tiny):
    path, hf_model, _ = tiny
    prompt = _prompts()[4]
    assert_greedy_logprobs_match_hf(LLM(path, skip_tokenizer_init=True, dtype="float32"), hf_model, prompt)


def test_sync_free_experts_match_gathered_experts():
    from pagedllm.layers.moe import dense_experts, fused_experts, route

    torch.manual_seed(0)
    x, w13, w2 = torch.randn(13, 16), torch.randn(8, 24, 16), torch.randn(8, 16, 12)
    weights, ids = route(torch.randn(13, 8), top_k=2, renormalize=True)
    assert torch.allclose(fused_experts(x, w13, w2, weights, ids), dense_experts(x, w13, w2, weights, ids), atol=1e-5)


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_stacked_expert_checkpoint_loads_like_per_expert(architecture, tmp_path):
    """HF v5 in-memory names (experts.gate_up_proj [E, 2I, H]) load like the saved per-expert ones."""
    import json

    from safetensors.torch import load_file

    from pagedllm.models.registry import resolve_model_class

    hf_model = build_tiny_model(architecture, str(tmp_path), configs=CONFIGS)
    config = {**json.load(open(tmp_path / "config.json")), "_max_model_len": 64}
    cls = resolve_model_class([architecture])
    saved, stacked = cls(config), cls(config)
    names = {n for n, _ in saved.named_parameters(remove_duplicate=False)}
    assert saved.load_weights(load_file(str(tmp_path / "model.safetensors")).items()) == names
    assert any(".experts.gate_up_proj" in n for n in hf_model.state_dict())
    assert stacked.load_weights(hf_model.state_dict().items()) == names
    for (name, a), (_, b) in zip(saved.state_dict().items(), stacked.state_dict().items()):
        assert torch.equal(a, b), name
