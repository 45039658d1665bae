"""Gemma 2, Gemma 3 and a sliding-window Mistral equal Hugging Face (greedy ids, also preempted and
chunked; logprobs), with windows shorter than most prompts; Mistral frees blocks behind its window."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.kv_cache_manager import NULL_BLOCK
from tests.models.tiny_models import (
    SLIDING_WINDOW,
    SLIDING_WINDOW_CONFIGS,
    assert_greedy_logprobs_match_hf,
    build_tiny_model,
    engine_greedy,
    hf_greedy,
    random_prompts,
)

MAX_NEW_TOKENS = 16


def _prompts() -> list[list[int]]:
    # Window 12: shorter, equal, one longer, and several times longer prompts.
    return random_prompts([1, 3, 8, 12, 13, 17, 31, 47], seed=1)


GEMMA_ARCHITECTURES = ["Gemma2ForCausalLM", "Gemma3ForCausalLM"]
# A small pool (64 blocks of 16) keeps engine start-up cheap; every test workload fits it.
SMALL_POOL = dict(num_gpu_blocks_override=64)


def _build(architecture: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module, list[list[int]]]:
    """(model dir, HF model, HF greedy outputs for the shared prompts)."""
    path = str(tmp_path_factory.mktemp(architecture))
    hf_model = build_tiny_model(architecture, path, configs=SLIDING_WINDOW_CONFIGS, perturb_norms=True)
    return path, hf_model, hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)


@pytest.fixture(scope="module", params=GEMMA_ARCHITECTURES)
def gemma(request, tmp_path_factory):
    """A tiny Gemma 2 or Gemma 3 (sliding and global layers mixed)."""
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny Mistral whose every layer slides: the KV cache manager frees blocks behind the window."""
    return _build("MistralForCausalLM", tmp_path_factory)


def _generate(path: str, expect_preemption: bool = False, **engine_args) -> list[list[int]]:
    return engine_greedy(path, _prompts(), MAX_NEW_TOKENS, expect_preemption, **{**SMALL_POOL, **engine_args})


def test_greedy_matches_hf(gemma):
    path, _, expected = gemma
    assert _generate(path) == expected


def test_greedy_matches_hf_under_preemption(gemma):
    path, _, expected = gemma
    # 5 blocks of 16 tokens: one 63-token sequence fits, eight together do not.
    assert _generate(path, expect_preemption=True, num_gpu_blocks_override=5, max_model_len=80) == expected


def test_greedy_matches_hf_with_every_prompt_chunked(gemma):
    path, _, expected = gemma
    assert _generate(path, max_num_batched_tokens=7, block_size=4, num_gpu_blocks_override=256) == expected


def test_logprobs_match_hf_fp32(gemma):
    path, hf_model, _ = gemma
    prompt = _prompts()[6]  # 31 tokens: well past the window
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", **SMALL_POOL)
    assert_greedy_logprobs_match_hf(llm, hf_model, prompt)
    # Global layers read every token: a model mixing them in frees no block early.
    assert llm.llm_engine.engine_core.kv_cache_manager.sliding_window is None


def test_mistral_frees_blocks_behind_the_window_and_matches_hf(mistral):
    path, _, expected = mistral
    block_size, chunk = 4, 7
    llm = LLM(path, skip_tokenizer_init=True, block_size=block_size, max_num_batched_tokens=chunk,
              num_gpu_blocks_override=256)
    engine = llm.llm_engine
    manager = engine.engine_core.kv_cache_manager
    assert manager.sliding_window == SLIDING_WINDOW
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    for repeat in range(2):  # the second round starts from prefix-cache hits on the first's blocks
        for i, prompt in enumerate(_prompts()):
            engine.add_request(f"{repeat}-{i}", {"prompt_token_ids": prompt}, params)
        outputs, freed_any = {}, False
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id] = output.outputs[0].token_ids
            for table in manager.req_to_blocks.values():
                freed_any |= NULL_BLOCK in table
                if repeat == 0:  # (a request admitted with prefix hits holds them for one step)
                    # The window's W - 1 earlier keys, one chunk, and a partial block at each end.
                    held = sum(block is not NULL_BLOCK for block in table)
                    assert held <= (SLIDING_WINDOW - 1 + chunk) // block_size + 2
        assert freed_any
        assert [outputs[f"{repeat}-{i}"] for i in range(len(expected))] == expected
        assert manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks
    assert engine.engine_core.scheduler.num_prefix_cache_hits > 0


def test_mistral_parallel_samples_of_prompts_longer_than_the_window_match_hf(mistral):
    path, _, expected = mistral
    llm = LLM(path, skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=256)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    chosen = (2, 5, 7)  # shorter than the window (forked) and longer (partly freed: cache hits instead)
    outputs = llm.generate([{"prompt_token_ids": _prompts()[i]} for i in chosen], params, use_tqdm=False)
    for output, i in zip(outputs, chosen):
        assert [sample.token_ids for sample in output.outputs] == [expected[i]] * 2
    assert llm.llm_engine.engine_core.kv_cache_manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks


def test_gemma3_rope_settings_read_alike_from_old_and_new_configs():
    from pagedllm.models.gemma import gemma3_rope_parameters

    old = dict(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    new = dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    for sliding in (True, False):
        assert gemma3_rope_parameters(old, sliding) == gemma3_rope_parameters(new, sliding)
    assert gemma3_rope_parameters(old, sliding=True) == {"rope_type": "default", "rope_theta": 1e4}


def test_hub_style_gemma_configs_get_hugging_face_defaults():
    from pagedllm.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, _max_model_len=32)
    gemma2 = Gemma2ForCausalLM(dict(shape, model_type="gemma2"))
    attn = gemma2.model.layers[0].self_attn.attn
    assert (attn.sliding_window, attn.logits_soft_cap, attn.scale) == (4096, 50.0, 256**-0.5)
    assert gemma2.model.layers[1].self_attn.attn.sliding_window is None
    assert gemma2.tie_word_embeddings and gemma2.final_logit_softcapping == 30.0
    gemma3 = Gemma3ForCausalLM(dict(shape, model_type="gemma3_text", num_hidden_layers=6, sliding_window=512))
    windows = [layer.self_attn.attn.sliding_window for layer in gemma3.model.layers]
    assert windows == [512] * 5 + [None] and gemma3.final_logit_softcapping is None
    assert gemma3.model.layers[0].self_attn.attn.logits_soft_cap is None
