"""Builders of tiny random-weight Hugging Face models saved as local directories."""

from __future__ import annotations

import os
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


def build_tiny_model(architecture: str, path: str, seed: int = 0) -> torch.nn.Module:
    """Create, save (safetensors + config.json) and return a tiny random HF model."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(**_COMMON, **TINY_CONFIGS[architecture])
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
