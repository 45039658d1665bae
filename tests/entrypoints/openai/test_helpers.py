"""Server helpers that need no model: stream merging, error mapping, metrics, benchmark workload."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.benchmarks.serve import make_requests, percentile
from pagedllm.core.scheduler import SchedulerStats
from pagedllm.engine.async_llm import summarize_failure
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.engine.stats import FinishedRequestStats, IterationStats
from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
from pagedllm.entrypoints.openai.serving_engine import as_openai_error, bad_request_from, merge_async_iterators


async def _numbers(start: int, count: int, delay: float = 0.0):
    for i in range(start, start + count):
        await asyncio.sleep(delay)
        yield i


def test_merge_yields_every_item_tagged_with_its_source():
    async def run() -> list[tuple[int, int]]:
        return [item async for item in merge_async_iterators([_numbers(0, 3), _numbers(10, 2)])]

    merged = asyncio.run(run())
    assert sorted(merged) == [(0, 0), (0, 1), (0, 2), (1, 10), (1, 11)]
    assert [v for i, v in merged if i == 0] == [0, 1, 2]  # each source keeps its order


def test_merge_cancels_every_source_when_the_consumer_stops():
    closed: list[int] = []

    async def endless(index: int):
        try:
            while True:
                await asyncio.sleep(0.001)
                yield index
        finally:
            closed.append(index)

    async def run() -> None:
        merged = merge_async_iterators([endless(0), endless(1)])
        async for _ in merged:
            break
        await merged.aclose()
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert sorted(closed) == [0, 1]


def test_merge_raises_a_source_error():
    async def failing():
        yield 1
        raise ValueError("bad token")

    async def run() -> None:
        async for _ in merge_async_iterators([failing(), _numbers(0, 5, delay=0.01)]):
            pass

    with pytest.raises(ValueError, match="bad token"):
        asyncio.run(run())


def test_errors_map_to_status_and_param():
    error = bad_request_from(ValueError("top_p must be in (0, 1], got 0."), None, {"top_p", "n"})
    assert (error.status_code, error.param) == (400, "top_p")
    assert bad_request_from(ValueError("The prompt is empty."), "prompt", {"top_p"}).param == "prompt"
    assert as_openai_error(EngineDeadError("gone")).status_code == 503
    assert as_openai_error(ValueError("bad")).status_code == 400
    body = as_openai_error(RuntimeError("bug in /srv/secret.py")).to_body().model_dump()
    assert body["error"]["type"] == "server_error" and "secret" not in body["error"]["message"]


def test_engine_core_crash_reports_reach_clients_without_their_traceback():
    report = ("The engine core crashed:\nTraceback (most recent call last):\n  File \"/srv/x.py\", line 3\n"
              "RuntimeError: boom\n")
    assert summarize_failure(report) == "The engine core crashed: RuntimeError: boom"
    assert summarize_failure("The engine core process exited unexpectedly (exit code -9).") == \
        "The engine core process exited unexpectedly (exit code -9)."


def test_prometheus_logger_counts_tokens_requests_and_preemption_increases():
    logger = PrometheusStatLogger("m", num_kv_tokens=1024)
    stats = IterationStats(num_prompt_tokens=7, num_generation_tokens=3, time_to_first_tokens=[0.1],
                           inter_token_latencies=[0.01, 0.02],
                           finished_requests=[FinishedRequestStats("length", 7, 3, e2e_latency=0.5, queue_time=0.0)])
    logger.record(SchedulerStats(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_preemptions=2), stats)
    logger.record(SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_preemptions=3), None)
    text = logger.render()[0].decode()
    assert 'pagedllm:prompt_tokens_total{model_name="m"} 7.0' in text
    assert 'pagedllm:generation_tokens_total{model_name="m"} 3.0' in text
    assert 'pagedllm:num_preemptions_total{model_name="m"} 3.0' in text
    assert 'pagedllm:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    assert 'pagedllm:kv_cache_usage_perc{model_name="m"} 0.0' in text
    assert 'pagedllm:inter_token_latency_seconds_count{model_name="m"} 2.0' in text


def test_prometheus_logger_adds_the_increase_of_the_cumulative_prefix_cache_counts():
    logger = PrometheusStatLogger("m")
    for queries, hits in ((100, 0), (300, 160), (300, 160)):
        logger.record(SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_preemptions=0,
                                     prefix_cache_queries=queries, prefix_cache_hits=hits), None)
    text = logger.render()[0].decode()
    assert 'pagedllm:prefix_cache_queries_total{model_name="m"} 300.0' in text
    assert 'pagedllm:prefix_cache_hits_total{model_name="m"} 160.0' in text


def test_benchmark_workload_is_reproducible_and_sized_as_asked():
    first = make_requests(8, 100, 20, 0.5, seed=3)
    assert [(r.prompt_token_ids, r.output_len) for r in first] == \
        [(r.prompt_token_ids, r.output_len) for r in make_requests(8, 100, 20, 0.5, seed=3)]
    assert all(50 <= len(r.prompt_token_ids) <= 150 and 10 <= r.output_len <= 30 for r in first)
    assert all(len(r.prompt_token_ids) == 100 for r in make_requests(4, 100, 20, 0.0, seed=1))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 99) == 0.0
