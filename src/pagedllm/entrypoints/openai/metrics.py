"""Prometheus metrics of the server (`pagedllm:` prefix), fed by AsyncLLM's stat loggers, served at /metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedllm.core.scheduler import SchedulerStats
from pagedllm.engine.stats import IterationStats

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                            240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort", "error")


class PrometheusStatLogger:
    """Turns scheduler snapshots and iteration stats into Prometheus metrics in its own registry."""

    def __init__(self, model_name: str, num_kv_tokens: int | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedllm:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pagedllm:{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(f"pagedllm:{name}", doc, labels, buckets=buckets, registry=r)

        self.num_running = gauge("num_requests_running", "Requests in the running batch.").labels(model_name)
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.").labels(model_name)
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).").labels(
            model_name)
        self.kv_cache_tokens = gauge("kv_cache_capacity_tokens", "Tokens the KV-cache pool holds.").labels(model_name)
        if num_kv_tokens is not None:
            self.kv_cache_tokens.set(num_kv_tokens)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(model_name)
        self.preemptions = counter("num_preemptions", "Requests preempted (KV cache full).").labels(model_name)
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.").labels(model_name)
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache.").labels(model_name)
        finished = Counter("pagedllm:request_success", "Finished requests by finish reason.",
                           ["model_name", "finished_reason"], registry=r)
        self.finished = {reason: finished.labels(model_name, reason) for reason in FINISH_REASONS}
        self._finished_family = finished
        self._model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS).labels(model_name)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.",
                             _ITL_BUCKETS).labels(model_name)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token of finished requests.",
                             _REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.",
                                    _REQUEST_LATENCY_BUCKETS).labels(model_name)
        self._last_totals: dict[str, int] = {}

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        """Take one update from AsyncLLM."""
        if scheduler_stats is not None:
            self.num_running.set(scheduler_stats.num_running)
            self.num_waiting.set(scheduler_stats.num_waiting)
            self.kv_cache_usage.set(scheduler_stats.kv_cache_usage)
            # The scheduler counts these since it started; each counter takes the increase.
            self._add_increase(self.preemptions, "num_preemptions", scheduler_stats.num_preemptions)
            self._add_increase(self.prefix_cache_queries, "prefix_cache_queries", scheduler_stats.prefix_cache_queries)
            self._add_increase(self.prefix_cache_hits, "prefix_cache_hits", scheduler_stats.prefix_cache_hits)
        if iteration_stats is None:
            return
        if iteration_stats.num_prompt_tokens:
            self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        if iteration_stats.num_generation_tokens:
            self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens:
            self.ttft.observe(ttft)
        for itl in iteration_stats.inter_token_latencies:
            self.itl.observe(itl)
        for finished in iteration_stats.finished_requests:
            counter = self.finished.get(finished.finish_reason)
            if counter is None:
                counter = self.finished[finished.finish_reason] = self._finished_family.labels(
                    self._model_name, finished.finish_reason)
            counter.inc()
            if finished.e2e_latency is not None:
                self.e2e.observe(finished.e2e_latency)
            if finished.queue_time is not None:
                self.queue_time.observe(finished.queue_time)

    def _add_increase(self, counter: Counter, name: str, total: int) -> None:
        """Increment `counter` by how much the cumulative `total` grew since the last snapshot."""
        increase = total - self._last_totals.get(name, 0)
        if increase > 0:
            counter.inc(increase)
        self._last_totals[name] = total

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
