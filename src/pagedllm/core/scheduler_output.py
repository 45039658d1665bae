"""The scheduler's decision for one step, as plain data sent to the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.runner_output import LogprobsLists


@dataclass
class NewRequestData:
    """A request the runner has not seen yet (or one resumed after preemption): everything."""

    req_id: str
    prompt_token_ids: list[int]
    # Tokens already generated (non-empty only for a request resumed after preemption).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed since the last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # With pipeline stages, when this step's input is the request's newest known token (at
    # position num_computed_tokens): that token, which the stages that do not sample hold only
    # as a placeholder. None otherwise.
    last_token_id: int | None = None


@dataclass
class SchedulerOutput:
    """What to run this step: how many tokens of which requests, and their new blocks."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> number of tokens to compute this step (prefill chunk length, or 1 for a decode).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests finished or preempted since the last step: the runner drops its state for them.
    finished_req_ids: set[str] = field(default_factory=set)
    # Blocks that must be copied before this step runs (copy-on-write), as (src, dst) pairs.
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # With pipeline stages and async scheduling: decodes whose input is a token that a step still
    # in flight samples (decode ahead); the last stage sends those inputs to the first stage.
    decode_ahead_req_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """True when nothing is scheduled this step."""
        return self.total_num_scheduled_tokens == 0


@dataclass
class EngineCoreOutput:
    """What one request gained in one step, sent from the scheduler to the output processor."""

    req_id: str
    new_token_ids: list[int]
    # Logprobs of new_token_ids (one row per token), when the request asked for logprobs.
    new_logprobs: LogprobsLists | None = None
    # Prompt logprobs of the prompt positions computed this step, when asked for.
    new_prompt_logprobs: LogprobsLists | None = None
    # "stop", "length", "abort" or "error" once the request has finished, else None.
    finish_reason: str | None = None
    # The stop token id that ended the request (None for EOS, length or abort).
    stop_reason: int | str | None = None
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    # With finish_reason "error": what failed for this request alone.
    error: str | None = None

    @property
    def finished(self) -> bool:
        """True when this is the request's last output."""
        return self.finish_reason is not None
