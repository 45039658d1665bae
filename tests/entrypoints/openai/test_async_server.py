"""The server with async scheduling: the engine core process pipelines steps (schedule and launch
step N+1, then apply step N) under concurrent streams, disconnects and stop strings."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import MODEL_NAME, start_tiny_server, stop_server
from tests.entrypoints.openai.test_concurrency import wait_until_idle

pytestmark = requires_embedded_model

PROMPTS = [f"Item {i}: the colour of the sky is" for i in range(12)]


def _offline_texts(model_dir: str, max_tokens: int) -> list[str]:
    """The synchronous engine's greedy texts for PROMPTS (the oracle)."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.config import default_model_path

    llm = LLM(model_dir, tokenizer=default_model_path(), max_model_len=512, async_scheduling=False,
              kv_cache_memory_bytes=64 * 1024 * 1024)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def test_async_scheduling_server_matches_the_synchronous_engine_and_survives_disconnects(tiny_model_dir):
    max_tokens = 16
    expected = _offline_texts(tiny_model_dir, max_tokens)
    server = start_tiny_server(tiny_model_dir, ["--async-scheduling"])
    try:
        async def run() -> list[str]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                async def complete(prompt: str) -> str:
                    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True}
                    response = await client.post("/v1/completions", json=body)
                    assert response.status_code == 200, response.text
                    return response.json()["choices"][0]["text"]

                async def disconnect_after_two_chunks(prompt: str) -> None:
                    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        chunks = 0
                        async for line in response.aiter_lines():
                            chunks += line.startswith("data: ")
                            if chunks == 2:
                                break  # the client goes away while its request is in flight

                results = await asyncio.gather(*[complete(p) for p in PROMPTS],
                                               *[disconnect_after_two_chunks(p) for p in PROMPTS[:4]])
                return list(results[: len(PROMPTS)])

        assert asyncio.run(run()) == expected
        # The disconnected requests were aborted and freed: the server goes idle and still serves.
        with httpx.Client(base_url=server.url, timeout=30) as http:
            idle = wait_until_idle(http)
        assert all(idle[(f"pagedllm:{name}", ())] == 0
                   for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
        follow_up = httpx.post(f"{server.url}/v1/completions", timeout=60,
                               json={"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": max_tokens,
                                     "temperature": 0, "ignore_eos": True})
        assert follow_up.json()["choices"][0]["text"] == expected[0]
        assert "Traceback" not in server.log()
    finally:
        stop_server(server)
