"""Greedy token ids of the Llama family equal Hugging Face's, also under preemption and chunking."""

from __future__ import annotations


import pytest

from tests.models.tiny_models import TINY_CONFIGS, build_tiny_model, engine_greedy, hf_greedy, random_prompts

MAX_NEW_TOKENS = 24


def _prompts(seed: int = 0, count: int = 8) -> list[list[int]]:
    return random_prompts([1, 5, 16, 17, 33, 60, 100, 150][:count], seed=seed)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """(model dir, HF greedy outputs for the shared prompts) for one architecture."""
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model = build_tiny_model(request.param, path)
    return path, hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)


def _generate(path: str, expect_preemption: bool = False, **engine_args) -> list[list[int]]:
    return engine_greedy(path, _prompts(), MAX_NEW_TOKENS, expect_preemption, **engine_args)


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
