"""GPT-2 and OPT (pre- and post-LN, with projections) match Hugging Face: greedy ids, also under
preemption and with every prompt chunked, and top-token logprobs in fp32."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import VOCAB_SIZE, engine_greedy, hf_greedy, random_prompts

MAX_NEW_TOKENS = 24

_GPT2: dict[str, Any] = dict(vocab_size=VOCAB_SIZE, n_embd=64, n_head=4, n_layer=2, n_positions=512,
                             activation_function="gelu_new", bos_token_id=1, eos_token_id=2)
_OPT: dict[str, Any] = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                            ffn_dim=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# variant name -> (HF config class, HF model class, config fields)
TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2),
    "opt-pre-ln-proj": ("OPTConfig", "OPTForCausalLM", dict(_OPT, do_layer_norm_before=True, word_embed_proj_dim=32)),
    "opt-post-ln": ("OPTConfig", "OPTForCausalLM", dict(_OPT, do_layer_norm_before=False)),
}


def build_tiny(variant: str, path: str, seed: int = 0) -> torch.nn.Module:
    """Create, save and return a tiny random HF model of one variant."""
    import transformers

    config_name, model_name, fields = TINY_CONFIGS[variant]
    config = getattr(transformers, config_name)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)  # non-trivial norm weights and biases
            else:
                param.normal_(0.0, 0.08)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model


def _prompts(seed: int = 0) -> list[list[int]]:
    return random_prompts([1, 5, 16, 17, 33, 60, 100, 150], seed=seed)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """(model dir, HF model, HF greedy outputs for the shared prompts) for one variant."""
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model = build_tiny(request.param, path)
    return path, hf_model, hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)


def _generate(path: str, expect_preemption: bool = False, **engine_args) -> list[list[int]]:
    return engine_greedy(path, _prompts(), MAX_NEW_TOKENS, expect_preemption, **engine_args)


def test_greedy_matches_hf(tiny):
    path, _, expected = tiny
    assert _generate(path) == expected


def test_greedy_matches_hf_under_preemption(tiny):
    path, _, expected = tiny
    # 12 blocks of 16 tokens: one 174-token sequence fits, eight together do not.
    assert _generate(path, expect_preemption=True, num_gpu_blocks_override=12, max_model_len=192) == expected


def test_greedy_matches_hf_with_every_prompt_chunked(tiny):
    path, _, expected = tiny
    assert _generate(path, max_num_batched_tokens=7) == expected


def test_top_logprobs_match_hf_fp32(tiny):
    path, hf_model, _ = tiny
    prompt = _prompts()[4]
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 8
    ids = torch.tensor([prompt + list(out.token_ids)])
    with torch.no_grad():
        hf_logprobs = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)
    for step, (token, step_logprobs) in enumerate(zip(out.token_ids, out.logprobs)):
        hf_step = hf_logprobs[len(prompt) - 1 + step]
        assert token == int(hf_step.argmax())
        assert len(step_logprobs) >= 5
        for tok, lp in step_logprobs.items():
            assert abs(lp.logprob - float(hf_step[tok])) < 1e-4
