"""Greedy token ids of the Llama family equal Hugging Face's, also under preemption and chunking."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import TINY_CONFIGS, VOCAB_SIZE, build_tiny_model, hf_greedy

MAX_NEW_TOKENS = 24


def _prompts(seed: int = 0, count: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 5, 16, 17, 33, 60, 100, 150][:count]
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """(model dir, HF greedy outputs for the shared prompts) for one architecture."""
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model = build_tiny_model(request.param, path)
    return path, hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)


def _generate(path: str, expect_preemption: bool = False, **engine_args) -> list[list[int]]:
    llm = LLM(path, skip_tokenizer_init=True, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    core = llm.llm_engine.engine_core
    assert core.kv_cache_manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks
    assert (core.scheduler.num_preemptions > 0) == expect_preemption
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_hf(tiny):
    path, expected = tiny
    assert _generate(path) == expected


def test_greedy_matches_hf_under_preemption(tiny):
    path, expected = tiny
    # 12 blocks of 16 tokens: one 174-token sequence fits, eight together do not.
    llm_outputs = _generate(path, expect_preemption=True, num_gpu_blocks_override=12, max_model_len=192)
    assert llm_outputs == expected


def test_greedy_matches_hf_with_every_prompt_chunked(tiny):
    path, expected = tiny
    assert _generate(path, max_num_batched_tokens=7) == expected
