"""Per-step request statistics gathered by the front end, for metrics (Prometheus, logs).

Counts are per engine-core request (each of the n samples of a request counts as one), as vLLM
counts them. Latencies use the front end's clock: the time it saw each step's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pagedllm.core.scheduler import SchedulerStats
from pagedllm.core.scheduler_output import EngineCoreOutput
from pagedllm.engine.output_processor import RequestState


@dataclass
class FinishedRequestStats:
    """One engine-core request that just finished."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float | None = None  # arrival -> last output (None when aborted)
    queue_time: float | None = None  # arrival -> first scheduled


@dataclass
class IterationStats:
    """What the front end saw in one message from the core (usually one engine step)."""

    num_prompt_tokens: int = 0  # prompts whose first token arrived now
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

    def observe_output(self, state: RequestState, output: EngineCoreOutput, now: float) -> None:
        """Count one core output; call it before the output processor folds the output in."""
        num_new = len(output.new_token_ids)
        if num_new == 0:
            return
        self.num_generation_tokens += num_new
        metrics = state.metrics
        if metrics.first_token_time is None:
            self.num_prompt_tokens += len(state.prompt_token_ids)
            self.time_to_first_tokens.append(now - metrics.arrival_time)
        elif metrics.last_token_time is not None:
            self.inter_token_latencies.append(now - metrics.last_token_time)

    def observe_finished(self, state: RequestState) -> None:
        """Record a request the output processor has just finished."""
        metrics = state.metrics
        e2e = metrics.finished_time - metrics.arrival_time if metrics.finished_time is not None else None
        queue_time = None
        if metrics.first_scheduled_time is not None:
            queue_time = max(metrics.first_scheduled_time - metrics.arrival_time, 0.0)
        self.finished_requests.append(FinishedRequestStats(
            finish_reason=state.finish_reason or "abort",
            num_prompt_tokens=len(state.prompt_token_ids),
            num_generation_tokens=len(state.output_token_ids),
            e2e_latency=e2e,
            queue_time=queue_time,
        ))

    def observe_aborted(self, state: RequestState) -> None:
        """Record a request dropped by its client before it finished."""
        self.finished_requests.append(FinishedRequestStats(
            finish_reason="abort",
            num_prompt_tokens=len(state.prompt_token_ids),
            num_generation_tokens=len(state.output_token_ids),
        ))


class StatLogger(Protocol):
    """Anything that consumes scheduler snapshots and iteration stats (e.g. Prometheus)."""

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        """Take one update; either part may be None."""
        ...
