"""Builders of tiny random-weight Hugging Face models saved as local directories."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

VOCAB_SIZE = 512

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# architecture -> extra config fields exercising that family's features
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False,
    ),
    "MistralForCausalLM": dict(sliding_window=None, head_dim=16, tie_word_embeddings=False),
    "Qwen2ForCausalLM": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "Qwen3ForCausalLM": dict(head_dim=32, tie_word_embeddings=True, attention_bias=False),
}


def build_tiny_model(architecture: str, path: str, seed: int = 0,
                     configs: dict[str, dict[str, Any]] = TINY_CONFIGS) -> torch.nn.Module:
    """Create, save (safetensors + config.json) and return a tiny random HF model.

    `configs` maps the architecture to the fields it adds to (or overrides in) the shared tiny shape.
    """
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(**{**_COMMON, **configs[architecture]})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    # Larger-than-default weights give well-separated logits, so argmax is numerically stable.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.08)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy completions from Hugging Face `generate`, one prompt at a time (the oracle)."""
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 eos_token_id=None, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def random_prompts(lengths: list[int], vocab_size: int = VOCAB_SIZE, seed: int = 0) -> list[list[int]]:
    """Reproducible random token-id prompts of the given lengths (ids 0-2 left for special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def engine_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, expect_preemption: bool = False,
                  **engine_args: Any) -> list[list[int]]:
    """Greedy completions from pagedllm; asserts the pool ends empty and whether preemption happened."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(path, skip_tokenizer_init=True, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    core = llm.llm_engine.engine_core
    assert core.kv_cache_manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks
    assert (core.scheduler.num_preemptions > 0) == expect_preemption
    return [o.outputs[0].token_ids for o in outputs]
