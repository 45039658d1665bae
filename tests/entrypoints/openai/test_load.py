"""Load and faults: 1,000 streamed requests from 100 concurrent clients against the tiny model.

Every stream must end with [DONE] and the right token count, with no request lost and no 5xx;
afterwards the KV pool is entirely free and resident memory stays within a stated bound. In the
fault run, 30 % of the streams are cut by their client at a random point: those requests are
aborted (counted in /metrics) and their blocks freed, and every other answer is unchanged.
The figures go to stdout (`pytest -s`) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import (
    MODEL_NAME,
    RunningServer,
    engine_core_pid,
    process_rss_bytes,
    start_tiny_server,
    stop_server,
)
from tests.entrypoints.openai.test_concurrency import wait_until_idle

pytestmark = requires_embedded_model

NUM_REQUESTS = 1000
NUM_CLIENTS = 100
MAX_TOKENS = 12
NUM_DISTINCT_PROMPTS = 50
DISCONNECT_FRACTION = 0.3
# A stream its client cuts asks for this many tokens and is cut within its first MAX_TOKENS, so
# it is surely still running in the engine when the client goes: every cut is an abort.
CUT_MAX_TOKENS = 400
# Resident memory either process may gain over a whole run (after warm-up). Measured growth is
# a few MiB (docs/reliability.md); the bound leaves room for allocator noise, not for a leak of
# per-request state (1,000 requests x even 100 KiB would exceed it).
RSS_GROWTH_BOUND = 64 * 1024 * 1024
MAX_MODEL_LEN = 512

PROMPTS = [f"Request {i}: write a few words about the number {i * 7}." for i in range(NUM_DISTINCT_PROMPTS)]


@dataclass
class StreamResult:
    """What one client saw of one streamed request."""

    status: int
    text: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    done: bool = False
    cut: bool = False
    error: str | None = None


@pytest.fixture(scope="module")
def load_server(tiny_model_dir: str):
    """A tiny-model server with the default limits."""
    # glibc gives each thread that allocates its own arena (up to 8 per core); under a loaded CI
    # machine more threads get one, which is RSS growth without a leak. Two arenas keep the
    # measurement about the server's own state.
    previous = os.environ.get("MALLOC_ARENA_MAX")
    os.environ["MALLOC_ARENA_MAX"] = "2"
    try:
        server = start_tiny_server(tiny_model_dir, [], max_model_len=MAX_MODEL_LEN)
    finally:
        if previous is None:
            os.environ.pop("MALLOC_ARENA_MAX", None)
        else:
            os.environ["MALLOC_ARENA_MAX"] = previous
    # Warm-up: one-time allocations (thread pools, caches) are not growth.
    asyncio.run(_run_clients(server.url, [(PROMPTS[i % NUM_DISTINCT_PROMPTS], None) for i in range(NUM_CLIENTS)]))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def expected_texts(tiny_model_dir: str) -> list[str]:
    """The offline engine's greedy answers to the distinct prompts: the oracle."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.config import default_model_path

    llm = LLM(tiny_model_dir, tokenizer=default_model_path(), max_model_len=MAX_MODEL_LEN,
              kv_cache_memory_bytes=64 * 1024 * 1024)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


async def _stream(client: httpx.AsyncClient, prompt: str, cut_after: int | None) -> StreamResult:
    """One streamed completion; with `cut_after`, the client goes away after that many chunks."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": CUT_MAX_TOKENS if cut_after is not None else MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        result = StreamResult(status=response.status_code)
        if response.status_code != 200:
            result.error = (await response.aread()).decode(errors="replace")
            return result
        num_chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                result.done = True
                break
            event = json.loads(payload)
            if "error" in event:
                result.error = event["error"]["message"]
                continue
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                result.text += choice["text"]
                if choice["finish_reason"] is not None:
                    result.finish_reasons.append(choice["finish_reason"])
            num_chunks += 1
            if cut_after is not None and num_chunks > cut_after:
                result.cut = True
                break  # leaving the block closes the connection mid-stream
    return result


async def _run_clients(url: str, jobs: list[tuple[str, int | None]]) -> list[StreamResult]:
    """NUM_CLIENTS concurrent clients working through `jobs` (prompt, cut point); results in job order."""
    results: list[StreamResult | None] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        async def worker() -> None:
            for index in next_job:
                prompt, cut_after = jobs[index]
                try:
                    results[index] = await _stream(client, prompt, cut_after)
                except httpx.HTTPError as e:  # a lost request: counted, never raised
                    results[index] = StreamResult(status=0, error=repr(e))

        await asyncio.gather(*[worker() for _ in range(NUM_CLIENTS)])
    return [r for r in results if r is not None]


def _rss(server: RunningServer) -> tuple[int, int]:
    return process_rss_bytes(server.proc.pid), process_rss_bytes(engine_core_pid(server.proc.pid))


def _report(title: str, results: list[StreamResult], before: tuple[int, int], after: tuple[int, int],
            aborted: float) -> None:
    mib = 1024 * 1024
    statuses = Counter(r.status for r in results)
    print(f"\n[{title}] sent {len(results)}, completed {sum(r.done and not r.cut for r in results)}, "
          f"cut by client {sum(r.cut for r in results)}, aborted (metrics) {aborted:.0f}, "
          f"statuses {dict(statuses)}, stream errors {sum(r.error is not None for r in results)}; "
          f"RSS API {before[0] / mib:.1f} -> {after[0] / mib:.1f} MiB, "
          f"engine core {before[1] / mib:.1f} -> {after[1] / mib:.1f} MiB")


ABORT = ("pagedllm:request_success_total", (("finished_reason", "abort"),))
LENGTH = ("pagedllm:request_success_total", (("finished_reason", "length"),))


def _check_idle(after: dict) -> None:
    assert after[("pagedllm:kv_cache_usage_perc", ())] == 0
    assert after[("pagedllm:num_requests_running", ())] == 0 and after[("pagedllm:num_requests_waiting", ())] == 0


def test_1000_streams_from_100_clients_complete_and_leave_the_pool_free(load_server, expected_texts):
    with httpx.Client(base_url=load_server.url, timeout=60) as http:
        before = wait_until_idle(http)
        rss_before = _rss(load_server)
        jobs = [(PROMPTS[i % NUM_DISTINCT_PROMPTS], None) for i in range(NUM_REQUESTS)]
        results = asyncio.run(_run_clients(load_server.url, jobs))
        after = wait_until_idle(http, timeout=60)
    rss_after = _rss(load_server)
    _report("load", results, rss_before, rss_after, after.get(ABORT, 0) - before.get(ABORT, 0))

    assert len(results) == NUM_REQUESTS
    assert [r.status for r in results] == [200] * NUM_REQUESTS, Counter(r.status for r in results)
    assert all(r.error is None and r.done for r in results), [r.error for r in results if r.error][:3]
    assert all(r.finish_reasons == ["length"] and r.completion_tokens == MAX_TOKENS for r in results)
    assert [r.text for r in results] == [expected_texts[i % NUM_DISTINCT_PROMPTS] for i in range(NUM_REQUESTS)]
    _check_idle(after)
    assert after[LENGTH] - before.get(LENGTH, 0) == NUM_REQUESTS
    assert after.get(ABORT, 0) == before.get(ABORT, 0)
    assert rss_after[0] - rss_before[0] < RSS_GROWTH_BOUND and rss_after[1] - rss_before[1] < RSS_GROWTH_BOUND


def test_30_percent_of_streams_cut_by_their_clients_are_aborted_and_the_rest_unchanged(load_server, expected_texts):
    rng = random.Random(7)
    cuts = [rng.randrange(MAX_TOKENS) if rng.random() < DISCONNECT_FRACTION else None for _ in range(NUM_REQUESTS)]
    jobs = [(PROMPTS[i % NUM_DISTINCT_PROMPTS], cut) for i, cut in enumerate(cuts)]
    num_cut = sum(cut is not None for cut in cuts)
    with httpx.Client(base_url=load_server.url, timeout=60) as http:
        before = wait_until_idle(http)
        rss_before = _rss(load_server)
        results = asyncio.run(_run_clients(load_server.url, jobs))
        after = wait_until_idle(http, timeout=60)
    rss_after = _rss(load_server)
    aborted = after.get(ABORT, 0) - before.get(ABORT, 0)
    _report("faults", results, rss_before, rss_after, aborted)

    assert [r.status for r in results] == [200] * NUM_REQUESTS, Counter(r.status for r in results)
    assert sum(r.cut for r in results) == num_cut
    for i, r in enumerate(results):
        if r.cut:
            continue
        assert r.error is None and r.done and r.finish_reasons == ["length"] and r.completion_tokens == MAX_TOKENS
        assert r.text == expected_texts[i % NUM_DISTINCT_PROMPTS]
    # Every cut stream was aborted, every other one finished: nothing lost, and the pool is free.
    assert aborted == num_cut
    assert after[LENGTH] - before.get(LENGTH, 0) == NUM_REQUESTS - num_cut
    _check_idle(after)
    assert rss_after[0] - rss_before[0] < RSS_GROWTH_BOUND and rss_after[1] - rss_before[1] < RSS_GROWTH_BOUND
