"""Request: one sequence as the engine core sees it (token ids, progress, status, blocks)."""

from __future__ import annotations

import enum
import time

from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Every status above PREEMPTED is a finished one.

    FINISHED_ERROR: something failed for this request alone (its logits processor raised); the
    rest of the batch goes on.
    """

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        """True for the finished statuses."""
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        """OpenAI's finish_reason for a finished status ("stop", "length", "abort"; vLLM's "error")."""
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence in the engine core.

    `all_token_ids` is prompt + output; the first `num_computed_tokens` of them have their
    K/V in the cache. A preempted request drops its cache and recomputes from zero (or from
    what the prefix cache still holds).

    `cache_salt` keeps the request's prefix-cache entries apart from those of requests with
    another salt (e.g. per tenant). `fork_source_id` names a sibling with the same prompt (the
    first of n parallel samples) whose prompt blocks this request shares once they are computed.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        fork_source_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.fork_source_id = fork_source_id
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens being sampled by steps whose results the scheduler has not seen yet: one from
        # schedule() until update_from_output() in a synchronous engine, up to two while the
        # engine schedules step N+1 before step N's results are back (async scheduling).
        self.num_output_placeholders = 0
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        # Prefix-cache hash of each full block of all_token_ids (filled by the KV cache manager).
        self.block_hashes: list[bytes] = []
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why a FINISHED_ERROR request failed
        max_tokens = sampling_params.max_tokens
        self.max_tokens: int = max_tokens if max_tokens is not None else 1 << 62

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        """Record newly sampled tokens."""
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        """True once the request has stopped for any reason."""
        return RequestStatus.is_finished(self.status)

    def get_finish_reason(self) -> str | None:
        """"stop", "length", "abort", "error", or None while unfinished."""
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
