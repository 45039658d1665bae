"""Turns the engine core's per-step outputs into RequestOutputs: text, stop strings, logprobs, n > 1."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.worker.runner_output import LogprobsLists

if TYPE_CHECKING:
    from pagedllm.core.scheduler_output import EngineCoreOutput
    from pagedllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ProcessedOutputs:
    """Result of one step: outputs for users, and requests the engine core must now finish."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    # Requests that hit a stop string or failed here: finished, but still running in the engine core.
    reqs_to_abort: list[str] = field(default_factory=list)


def make_logprob_dicts(
    rows: LogprobsLists, num_logprobs: int, decode: Callable[[int], str] | None
) -> list[dict[int, Logprob]]:
    """One {token id: Logprob} per row: the sampled (or prompt) token first, then top-1..top-k.

    Rows may be wider than this request asked for (the runner uses the batch's largest k), so
    only 1 + num_logprobs entries are kept.
    """
    dicts: list[dict[int, Logprob]] = []
    for token_ids, logprobs, rank in zip(rows.token_ids, rows.logprobs, rows.ranks):
        entry: dict[int, Logprob] = {}
        for pos in range(min(len(token_ids), num_logprobs + 1)):
            token_id = token_ids[pos]
            if token_id in entry:  # the sampled token is also in the top-k: one entry for it
                continue
            text = decode(token_id) if decode is not None else None
            entry[token_id] = Logprob(logprobs[pos], rank if pos == 0 else pos, text)
        dicts.append(entry)
    return dicts


def _record_token_times(metrics: RequestMetrics, num_new_tokens: int, now: float) -> None:
    """Note the arrival of `num_new_tokens` tokens at `now` (first/last token, per-token times)."""
    if num_new_tokens == 0:
        return
    if metrics.first_token_time is None:
        metrics.first_token_time = now
    metrics.last_token_time = now
    metrics.token_times.extend([now] * num_new_tokens)


class RequestState:
    """Everything the output processor keeps for one engine-core request."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        tokenizer: Tokenizer | None,
        parent: ParentRequest | None = None,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.parent = parent
        self.index = index
        self.detokenizer: IncrementalDetokenizer | None = None
        # Text of single tokens, for logprobs; None leaves Logprob.decoded_token unset.
        self.decode_token: Callable[[int], str] | None = None
        if tokenizer is not None and params.detokenize:
            self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
            self.decode_token = tokenizer.id_to_text
        self.output_token_ids: list[int] = []
        wants_logprobs = params.logprobs is not None
        self.logprobs: SampleLogprobs | None = [] if wants_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if wants_logprobs else None
        # Position 0 has no logprob (nothing precedes it); rows arrive per prefill chunk.
        wants_prompt_logprobs = params.prompt_logprobs is not None
        self.prompt_logprobs: PromptLogprobs | None = [None] if wants_prompt_logprobs else None
        self.prompt_logprobs_sent = False
        self.num_sent_tokens = 0  # DELTA outputs: tokens (and logprobs) already handed out
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # with finish_reason "error": what failed
        self.metrics = RequestMetrics(arrival_time=arrival_time)

    @property
    def finished(self) -> bool:
        """True once the request has a finish_reason."""
        return self.finish_reason is not None

    def update(self, out: EngineCoreOutput, now: float) -> str | None:
        """Fold one step's output in; return the stop string it completed, if any."""
        self.num_cached_tokens = out.num_cached_tokens
        self.output_token_ids.extend(out.new_token_ids)
        _record_token_times(self.metrics, len(out.new_token_ids), now)
        if out.new_logprobs is not None and self.logprobs is not None:
            new = make_logprob_dicts(out.new_logprobs, self.params.logprobs or 0, self.decode_token)
            self.logprobs.extend(new)
            sampled = sum(row[0] for row in out.new_logprobs.logprobs)
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sampled
        if out.new_prompt_logprobs is not None and self.prompt_logprobs is not None:
            num = self.params.prompt_logprobs or 0
            self.prompt_logprobs.extend(make_logprob_dicts(out.new_prompt_logprobs, num, self.decode_token))

        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        stop_string = None
        if self.detokenizer is not None:
            stop_string = self.detokenizer.update(
                out.new_token_ids, stop_terminated=finish_reason == "stop", finished=finish_reason is not None
            )
            if stop_string is not None:
                finish_reason, stop_reason = "stop", stop_string
        if finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
            self.error = out.error
            self.metrics.finished_time = now
        return stop_string

    def fail(self, error: str, now: float) -> None:
        """Finish this request alone with finish_reason "error" (something failed for it here)."""
        self.finish_reason, self.stop_reason, self.error = "error", None, error
        self.metrics.finished_time = now

    def make_completion(self) -> CompletionOutput:
        """This request's sequence as its output_kind wants it (DELTA: only what is new)."""
        delta = self.params.output_kind == RequestOutputKind.DELTA
        finished = self.finished
        text = self.detokenizer.get_next_output_text(finished, delta) if self.detokenizer is not None else ""
        start = self.num_sent_tokens if delta else 0
        self.num_sent_tokens = len(self.output_token_ids)
        logprobs = self.logprobs[start:] if self.logprobs is not None else None
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=self.output_token_ids[start:],  # a copy: later steps must not change it
            cumulative_logprob=self.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
        )

    def take_prompt_logprobs(self) -> PromptLogprobs | None:
        """Prompt logprobs for the next output: every time, or only the first time for DELTA."""
        if self.prompt_logprobs is None:
            return None
        if self.params.output_kind == RequestOutputKind.DELTA:
            if self.prompt_logprobs_sent:
                return None
            self.prompt_logprobs_sent = True
        return list(self.prompt_logprobs)


class ParentRequest:
    """A request with n > 1, fanned out into n independent child requests (one sample each).

    The children run as ordinary requests in the engine core; their outputs are gathered here
    into one RequestOutput with n CompletionOutputs, under the parent's request id.
    """

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.n = params.n
        self.output_kind = params.output_kind
        self.child_ids = [f"{i}_{request_id}" for i in range(self.n)]
        self.latest: list[CompletionOutput | None] = [None] * self.n  # last full output per child
        self.changed: dict[int, CompletionOutput] = {}  # child outputs produced this step
        self.unfinished: set[int] = set(range(self.n))
        self.prompt_logprobs: PromptLogprobs | None = None
        self.prompt_logprobs_sent = False
        self.num_cached_tokens: int | None = None
        # Set from the first child added to the output processor (all children share them).
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.num_children_added = 0

    def child_requests(self) -> list[tuple[str, SamplingParams, int]]:
        """(child request id, child params, index) for each of the n samples.

        A seeded request gives child i the seed `seed + i`, so the samples differ but are
        reproducible.
        """
        children = []
        for i, child_id in enumerate(self.child_ids):
            seed = self.params.seed + i if self.params.seed is not None else None
            children.append((child_id, self.params.clone(n=1, seed=seed), i))
        return children

    @property
    def finished(self) -> bool:
        """True once every child has finished."""
        return not self.unfinished

    def record_child(self, state: RequestState, num_new_tokens: int, now: float) -> None:
        """Take one child's step: its completion, prompt logprobs, cache hits and timestamps."""
        _record_token_times(self.metrics, num_new_tokens, now)
        cached = state.num_cached_tokens
        # The request's own prompt work: a sibling's prefix-cache hit on it does not count.
        if self.num_cached_tokens is None or cached < self.num_cached_tokens:
            self.num_cached_tokens = cached
        if self.prompt_logprobs is None and state.prompt_logprobs is not None:
            self.prompt_logprobs = state.prompt_logprobs
        if state.finished:
            self.unfinished.discard(state.index)
            if self.finished:
                self.metrics.finished_time = now
        if self.output_kind == RequestOutputKind.FINAL_ONLY and not state.finished:
            return
        completion = state.make_completion()
        self.changed[state.index] = completion
        if self.output_kind != RequestOutputKind.DELTA:
            self.latest[state.index] = completion

    def make_request_output(self) -> RequestOutput | None:
        """The aggregate output of this step, or None when nothing should be emitted yet."""
        changed, self.changed = self.changed, {}
        if not changed or (self.output_kind == RequestOutputKind.FINAL_ONLY and not self.finished):
            return None
        if self.output_kind == RequestOutputKind.DELTA:
            outputs = [changed[i] for i in sorted(changed)]
            prompt_logprobs = None if self.prompt_logprobs_sent else self.prompt_logprobs
            self.prompt_logprobs_sent = self.prompt_logprobs_sent or prompt_logprobs is not None
        else:
            outputs = [self.latest[i] or self._empty_completion(i) for i in range(self.n)]
            prompt_logprobs = self.prompt_logprobs
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens or 0,
            metrics=self.metrics,
        )

    def _empty_completion(self, index: int) -> CompletionOutput:
        """Placeholder for a child that has produced nothing yet (CUMULATIVE keeps all n slots)."""
        wants_logprobs = self.params.logprobs is not None
        return CompletionOutput(index, "", [], 0.0 if wants_logprobs else None, [] if wants_logprobs else None)


class OutputProcessor:
    """Keeps a RequestState per engine-core request and builds RequestOutputs from core outputs."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.request_states: dict[str, RequestState] = {}
        self.parent_requests: dict[str, ParentRequest] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        parent: ParentRequest | None = None,
        index: int = 0,
    ) -> None:
        """Start tracking one engine-core request (a child of `parent` when n > 1)."""
        if request_id in self.request_states:
            raise ValueError(f"Request id {request_id!r} is already running; request ids must be unique.")
        state = RequestState(
            request_id, prompt, list(prompt_token_ids), params, arrival_time, self.tokenizer, parent, index
        )
        self.request_states[request_id] = state
        if parent is not None:
            self.parent_requests[parent.request_id] = parent
            if parent.num_children_added == 0:
                parent.metrics.arrival_time = arrival_time
                parent.prompt, parent.prompt_token_ids = prompt, state.prompt_token_ids
            parent.num_children_added += 1

    def process_outputs(
        self, engine_core_outputs: list[EngineCoreOutput], now: float | None = None
    ) -> ProcessedOutputs:
        """Fold one step's core outputs in; return the RequestOutputs to emit and stop-string hits.

        `now` (time.monotonic seconds) timestamps this step's tokens; it defaults to the clock.
        """
        now = time.monotonic() if now is None else now
        result = ProcessedOutputs()
        touched_parents: dict[str, ParentRequest] = {}
        for out in engine_core_outputs:
            state = self.request_states.get(out.req_id)
            if state is None:  # aborted by the user while this step ran
                continue
            try:
                stop_string = state.update(out, now)
            except Exception as e:  # e.g. the tokenizer fails on a token: this request alone fails
                logger.warning("Request %s failed while detokenizing its output (%s); the rest of the batch "
                               "goes on.", out.req_id, type(e).__name__)
                state.fail(f"Detokenizing the output failed: {type(e).__name__}: {e}", now)
                stop_string = ""  # like a stop-string hit: the engine core must free it
            if stop_string is not None and out.finish_reason is None:
                result.reqs_to_abort.append(out.req_id)
            if state.finished:
                del self.request_states[out.req_id]
            elif not out.new_token_ids:
                continue  # a prefill chunk that did not finish the prompt: nothing to show yet
            if state.parent is not None:
                state.parent.record_child(state, len(out.new_token_ids), now)
                touched_parents[state.parent.request_id] = state.parent
            elif state.finished or state.params.output_kind != RequestOutputKind.FINAL_ONLY:
                result.request_outputs.append(self._make_request_output(state))
        for parent in touched_parents.values():
            request_output = parent.make_request_output()
            if request_output is not None:
                result.request_outputs.append(request_output)
            if parent.finished:
                self.parent_requests.pop(parent.request_id, None)
        return result

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Stop tracking these requests (a parent id stands for its children).

        Returns the engine-core request ids that were dropped, for the engine core to abort.
        """
        dropped: list[str] = []
        for request_id in request_ids:
            parent = self.parent_requests.pop(request_id, None)
            core_ids = parent.child_ids if parent is not None else [request_id]
            for core_id in core_ids:
                state = self.request_states.pop(core_id, None)
                if state is None:
                    continue
                dropped.append(core_id)
                if state.parent is not None and parent is None:
                    state.parent.unfinished.discard(state.index)
                    if state.parent.finished:
                        self.parent_requests.pop(state.parent.request_id, None)
        return dropped

    def has_unfinished_requests(self) -> bool:
        """True while any tracked request has not finished."""
        return bool(self.request_states)

    def get_num_unfinished_requests(self) -> int:
        """Number of engine-core requests still tracked (each child of an n > 1 request counts)."""
        return len(self.request_states)

    def _make_request_output(self, state: RequestState) -> RequestOutput:
        """The RequestOutput of a request without a parent."""
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.take_prompt_logprobs(),
            outputs=[state.make_completion()],
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics,
        )
