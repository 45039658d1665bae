"""The embedded default model (SmolLM2-135M-Instruct GGUF) against HF transformers on the same weights."""

from __future__ import annotations

import pytest

from tests.conftest import requires_embedded_model

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs

pytestmark = requires_embedded_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "Photosynthesis is the process by which",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_greedy_matches_hf_on_the_same_dequantized_weights(llm):
    from pagedllm.benchmarks.throughput import build_hf_model
    from tests.models.tiny_models import hf_greedy

    hf_model = build_hf_model(EngineArgs(), "float32", "cpu")
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(hf_model, prompt_ids, MAX_TOKENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_chat_answers_paris(llm):
    outputs = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    answer = outputs[0].outputs[0]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"  # ended by <|im_end|>, not by the length limit


def test_text_prompt_is_tokenized_and_detokenized(llm):
    output = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert output.prompt_token_ids == tokenizer.encode("The capital of France is")
    assert output.outputs[0].text == tokenizer.decode(output.outputs[0].token_ids)
    assert "Paris" in output.outputs[0].text


def test_bfloat16_on_cpu_gives_the_same_answer():
    llm = LLM(dtype="bfloat16", max_model_len=512)
    outputs = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert llm.llm_engine.config.model_config.dtype == "bfloat16"
    assert "Paris" in outputs[0].outputs[0].text


def test_int8_weight_only_quantization_gives_the_same_answer():
    llm = LLM(quantization="int8", max_model_len=512)
    outputs = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert "Paris" in outputs[0].outputs[0].text


def test_two_pipeline_stages_give_one_process_tokens(llm):
    # The GGUF checkpoint through two stages of 15 layers each: the first embeds, the last loads
    # the tied embedding into its own LM head.
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]
    with LLM(pipeline_parallel_size=2, max_model_len=256) as staged:
        got = [o.outputs[0].token_ids for o in staged.generate(PROMPTS[:2], params, use_tqdm=False)]
    assert got == expected
