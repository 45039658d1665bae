"""Continuous batching across connections: 64 concurrent streams, metrics that add up, and disconnects."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME

pytestmark = requires_embedded_model

NUM_CLIENTS = 64
NUM_DISTINCT_PROMPTS = 16  # each sent by 4 clients: the offline oracle needs only the distinct ones
MAX_TOKENS = 6


def metric_values(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels other than model_name)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            values[(sample.name, labels)] = sample.value
    return values


def wait_until_idle(http: httpx.Client, timeout: float = 20.0) -> dict[tuple[str, tuple], float]:
    """Poll /metrics until nothing runs or waits and the KV pool is entirely free; return that snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        values = metric_values(http)
        idle = all(values[(f"pagedllm:{name}", ())] == 0
                   for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def _delta(after: dict, before: dict, name: str, labels: tuple = ()) -> float:
    return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)


def test_64_concurrent_streams_complete_correctly_and_leave_the_pool_free(server, http, offline_llm):
    from pagedllm import SamplingParams

    distinct = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(NUM_DISTINCT_PROMPTS)]
    prompts = [distinct[i % NUM_DISTINCT_PROMPTS] for i in range(NUM_CLIENTS)]
    before = wait_until_idle(http)

    async def run_clients() -> list[tuple[str, list[str], object]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as client:
            async def one(prompt: str) -> tuple[str, list[str], object]:
                stream = await client.completions.create(
                    model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                text, finishes, usage = "", [], None
                async for chunk in stream:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        text += choice.text
                        if choice.finish_reason is not None:
                            finishes.append(choice.finish_reason)
                return text, finishes, usage

            return await asyncio.gather(*[one(p) for p in prompts])

    results = asyncio.run(run_clients())
    expected = offline_llm.generate(distinct, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                                    use_tqdm=False)
    assert [r[0] for r in results] == [expected[i % NUM_DISTINCT_PROMPTS].outputs[0].text for i in range(NUM_CLIENTS)]
    assert all(r[1] == ["length"] for r in results)
    assert all(r[2].completion_tokens == MAX_TOKENS for r in results)

    after = wait_until_idle(http)
    assert after[("pagedllm:kv_cache_usage_perc", ())] == 0
    assert after[("pagedllm:num_requests_running", ())] == 0 and after[("pagedllm:num_requests_waiting", ())] == 0
    num_prompt_tokens = sum(r[2].prompt_tokens for r in results)
    assert _delta(after, before, "pagedllm:prompt_tokens_total") == num_prompt_tokens
    assert _delta(after, before, "pagedllm:generation_tokens_total") == NUM_CLIENTS * MAX_TOKENS
    assert _delta(after, before, "pagedllm:request_success_total", (("finished_reason", "length"),)) == NUM_CLIENTS
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert _delta(after, before, f"pagedllm:{histogram}_count") == NUM_CLIENTS, histogram
    assert _delta(after, before, "pagedllm:inter_token_latency_seconds_count") == NUM_CLIENTS * (MAX_TOKENS - 1)


ABORT = ("pagedllm:request_success_total", (("finished_reason", "abort"),))


def test_a_stream_whose_client_disconnects_is_aborted_and_its_blocks_freed(server, http):
    before = wait_until_idle(http)
    body = {"model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert metric_values(http)[("pagedllm:kv_cache_usage_perc", ())] > 0
    after = wait_until_idle(http, timeout=10)
    assert after[("pagedllm:kv_cache_usage_perc", ())] == 0
    assert after[("pagedllm:num_requests_running", ())] == 0
    assert after.get(ABORT, 0) - before.get(ABORT, 0) == 1


def test_a_non_streamed_request_whose_client_gives_up_is_aborted(server, http):
    before = wait_until_idle(http)
    body = {"model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.5)
    after = wait_until_idle(http, timeout=10)
    assert after[("pagedllm:kv_cache_usage_perc", ())] == 0
    assert after.get(ABORT, 0) - before.get(ABORT, 0) == 1
