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

# Sliding-window models: windows shorter than most test prompts, every other Gemma feature on
# (Gemma 2: layers sliding / global alternately, both soft caps; Gemma 3: q/k norm, a 2:1
# local / global pattern, separate local RoPE base and linear RoPE scaling on global layers).
SLIDING_WINDOW = 12
SLIDING_WINDOW_CONFIGS: dict[str, dict[str, Any]] = {
    "Gemma2ForCausalLM": dict(num_hidden_layers=4, head_dim=16, sliding_window=SLIDING_WINDOW,
                              query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    "Gemma3ForCausalLM": dict(num_hidden_layers=4, head_dim=16, sliding_window=SLIDING_WINDOW,
                              sliding_window_pattern=3, query_pre_attn_scalar=32, final_logit_softcapping=8.0,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1000000.0}}),
    # Every layer slides: the KV cache manager frees the blocks behind the window.
    "MistralForCausalLM": dict(sliding_window=SLIDING_WINDOW, head_dim=16, tie_word_embeddings=False),
}

# architectures whose config class is not named after them
_CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}


def build_tiny_model(architecture: str, path: str, seed: int = 0,
                     configs: dict[str, dict[str, Any]] = TINY_CONFIGS, perturb_norms: bool = False) -> torch.nn.Module:
    """Create, save (safetensors + config.json) and return a tiny random HF model.

    `configs` maps the architecture to the fields it adds to (or overrides in) the shared tiny shape;
    `perturb_norms` adds noise to the norm weights too (e.g. to check Gemma's 1 + weight scaling).
    """
    import transformers

    config_name = _CONFIG_CLASSES.get(architecture, architecture.replace("ForCausalLM", "Config"))
    config = getattr(transformers, config_name)(**{**_COMMON, **configs[architecture]})
    if architecture == "Gemma2ForCausalLM":
        # The oracle is HF's eager attention: transformers 5.17 defaults Gemma 2 to SDPA, whose
        # result differs from eager's once the soft cap and the sliding window both act (a
        # 450-token prompt's greedy tokens changed); 5.24 defaults to eager.
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    # Larger-than-default weights give well-separated logits, so argmax is numerically stable.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.08)
            elif perturb_norms:
                param.add_(torch.randn_like(param) * 0.1)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy completions from Hugging Face `generate`, one prompt at a time (the oracle), on the model's device."""
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 eos_token_id=None, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def assert_greedy_logprobs_match_hf(llm: Any, hf_model: torch.nn.Module, prompt: list[int], max_tokens: int = 8,
                                    atol: float = 1e-4) -> None:
    """pagedllm's greedy tokens for `prompt` are HF's argmax at every position, and their fp32
    log-probabilities are within `atol` of HF's (teacher-forced on pagedllm's tokens)."""
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :].float()
    hf_logprobs = torch.log_softmax(logits, dim=-1)
    for position, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert token == int(hf_logprobs[position].argmax())
        assert abs(entry[token].logprob - float(hf_logprobs[position, token])) < atol


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


def save_tiny_tokenizer(path: str, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a byte-level BPE of `vocab_size` tokens in-process and save it next to a tiny model,
    so that servers and text APIs can run on it (bos/eos are `<|endoftext|>`)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog.", "Paged attention stores keys and values in blocks.",
              "Tensor parallelism splits every layer across devices."] * 20
    backend.train_from_iterator(corpus, trainer)
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}, f)
