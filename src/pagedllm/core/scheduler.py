"""Iteration-level continuous batching: which requests run how many tokens each step.

There are no prefill or decode phases, only "tokens to compute" per request: a request needs
`num_tokens - num_computed_tokens` more tokens, whether those are a whole prompt, a chunk of one,
a single decode token, or the recomputation of a preempted request. Each step spends a token
budget on the running requests first (so decodes never starve behind long prompts), then on the
waiting ones in FCFS order, chunking a prompt that does not fit the rest of the budget.

When the pool runs out of blocks, the newest running request is preempted (its blocks freed,
recomputed later). The oldest running request is therefore never preempted while another one
holds blocks, so as long as one request of max_model_len fits the pool, every request completes.

With prefix caching, a request admitted from the queue starts after the tokens the KV cache
manager already holds for its prefix. Parallel samples (requests with a `fork_source_id`) wait
until their first sibling has computed the shared prompt, then fork its blocks: the prompt is
prefilled once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler_output import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedllm.request import Request, RequestStatus
from pagedllm.worker.runner_output import LogprobsLists, ModelRunnerOutput


@dataclass
class SchedulerStats:
    """A snapshot of the scheduler for logging and metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    # Preemptions since the scheduler was created.
    num_preemptions: int
    # Prefix cache, since the scheduler was created: prompt tokens of newly admitted requests
    # looked up (queries) and found cached (hits). Both stay 0 with prefix caching off.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Scheduler:
    """Decides each step's batch (`schedule`) and applies its results (`update_from_output`).

    Protocol of one engine step: `schedule()` -> the runner executes the SchedulerOutput ->
    `update_from_output()`. `schedule()` advances every scheduled request's
    `num_computed_tokens` by its scheduled tokens when it returns (as vLLM V1 does), so the
    NewRequestData / CachedRequestData it sends carry the value from *before* the step. A
    request samples a token this step exactly when its scheduled tokens reach its end, i.e.
    `data.num_computed_tokens + num_scheduled_tokens[req_id] == its number of tokens`, which
    is `request.num_computed_tokens == request.num_tokens` once schedule() has returned.

    Such a request holds a placeholder (`num_output_placeholders`) for the token until
    update_from_output() brings it. With async scheduling the engine calls schedule() for step
    N+1 before step N's update: a request whose token from step N is still a placeholder is
    scheduled one more decode (the runner feeds it the token on the device), unless the
    pending tokens already reach max_tokens / max_model_len. A request that stops on a token of
    step N (EOS, stop token) has computed one wasted token in step N+1, which is dropped; one
    preempted by step N+1's schedule() still receives its step-N token.

    With pipeline micro-batching (`max_concurrent_batches` > 1) up to that many steps are in
    flight, each taking at most 1 / max_concurrent_batches of the running requests, so the steps
    in flight stay balanced. A request whose token is still a placeholder is passed over (another
    step may run meanwhile); only with async scheduling, and only when no running request's token
    is in (e.g. a lone request), does it decode ahead: the step would otherwise run none of them.
    With pipeline stages (`include_last_token_ids`) a scheduled decode of a known token carries it
    (`CachedRequestData.last_token_id`): the first stage needs it as the decode input and never
    sees the sampled ids; a decode ahead (`SchedulerOutput.decode_ahead_req_ids`) gets its input
    from the last stage on the device instead.

    The runner must drop `finished_req_ids` before adding `scheduled_new_reqs` (an id can be
    reused by a new request once the old one finished), and must ignore ids it does not hold.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.scheduler_config = scheduler_config
        self.kv_cache_manager = kv_cache_manager
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_model_len = scheduler_config.max_model_len
        self.max_concurrent_batches = scheduler_config.max_concurrent_batches
        # Every unfinished request, by id.
        self.requests: dict[str, Request] = {}
        # FCFS queue; preempted requests go back to its front.
        self.waiting: deque[Request] = deque()
        # Oldest first: the preemption victim is always the last one.
        self.running: list[Request] = []
        # Finished or preempted since the last schedule(): the runner drops their state.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0
        # Unfinished requests whose sampling reads their output token values (see can_schedule_ahead).
        self._num_requests_reading_outputs = 0

    # ---- requests in and out ----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (FCFS). Raises ValueError if it could never run."""
        if request.request_id in self.requests:
            raise ValueError(
                f"Request id {request.request_id!r} is already in use by an unfinished request; "
                "request ids must be unique."
            )
        if request.num_tokens == 0:
            raise ValueError(
                f"Request {request.request_id!r} has an empty prompt; give it at least one token.")
        if request.num_tokens > self.max_model_len:
            raise ValueError(
                f"Request {request.request_id!r} has {request.num_tokens} tokens, more than "
                f"max_model_len={self.max_model_len}. Shorten the prompt or raise --max-model-len."
            )
        # The last sampled token is never fed back, so the cache holds at most final_len - 1
        # tokens, and never less than the prompt.
        final_len = min(request.num_tokens + request.max_tokens, self.max_model_len)
        max_kv_tokens = max(request.num_tokens, final_len - 1)
        num_blocks_needed = self.kv_cache_manager.get_num_blocks_needed(max_kv_tokens)
        if num_blocks_needed > self.kv_cache_manager.num_blocks:
            raise ValueError(
                f"Request {request.request_id!r} may need {max_kv_tokens} tokens of KV cache "
                f"({num_blocks_needed} blocks) but the pool only has "
                f"{self.kv_cache_manager.num_blocks} blocks of {self.kv_cache_manager.block_size} "
                "tokens. Lower max_tokens or --max-model-len, or give the KV cache more memory."
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if _reads_output_tokens(request):
            self._num_requests_reading_outputs += 1

    def finish_requests(self, req_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """Finish waiting or running requests from outside (stop string, client abort).

        Frees their blocks at once. Unknown or already finished ids are ignored, since an abort
        can race with the request finishing on its own.
        """
        if not RequestStatus.is_finished(finished_status):
            raise ValueError(f"finish_requests needs a finished status, got {finished_status.name}.")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        to_finish = [self.requests[i] for i in dict.fromkeys(req_ids) if i in self.requests]
        if not to_finish:
            return
        finishing = {id(request) for request in to_finish}
        self.running = [r for r in self.running if id(r) not in finishing]
        self.waiting = deque(r for r in self.waiting if id(r) not in finishing)
        for request in to_finish:
            if request.status == RequestStatus.RUNNING:
                self.finished_req_ids.add(request.request_id)
            request.status = finished_status
            self._free_request(request)

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        if _reads_output_tokens(request):
            self._num_requests_reading_outputs -= 1

    def has_unfinished_requests(self) -> bool:
        """True while some request is waiting or running."""
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        """Number of waiting plus running requests."""
        return len(self.requests)

    def make_stats(self) -> SchedulerStats:
        """A snapshot of queue lengths, KV cache usage and total preemptions."""
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.num_prefix_cache_queries,
            prefix_cache_hits=self.num_prefix_cache_hits,
        )

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's requests and token counts under the budget; see the class doc."""
        token_budget = self.max_num_batched_tokens
        num_scheduled_tokens: dict[str, int] = {}
        new_blocks_of: dict[str, list[int]] = {}
        new_reqs: list[Request] = []
        preempted_any = False

        # Running requests first, oldest first.
        micro_batching = self.max_concurrent_batches > 1
        # Micro-batches: this step's share of the running requests (the others fill the next steps).
        max_running = -(-len(self.running) // self.max_concurrent_batches)
        req_index = 0
        # Micro-batches with async scheduling: requests passed over for a pending token, which
        # decode ahead of it if no other running request can use this step (e.g. a lone one).
        pending_requests: list[Request] = []
        while req_index < len(self.running) and token_budget > 0 and len(num_scheduled_tokens) < max_running:
            request = self.running[req_index]
            # Decode ahead of a pending token (async scheduling); with micro-batches only below.
            pending = 0 if micro_batching else request.num_output_placeholders
            num_new_tokens = min(request.num_tokens + pending - request.num_computed_tokens, token_budget)
            if num_new_tokens <= 0 or self._reaches_length_limit(request):
                # Nothing to compute before a pending output arrives (a micro-batch may have decoded
                # ahead of it already), or the tokens already being sampled end the request
                # (max_tokens / max_model_len): another step would be waste.
                if num_new_tokens <= 0:
                    pending_requests.append(request)
                req_index += 1
                continue
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
                new_blocks = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
            if new_blocks is None:
                # The request preempted itself: every later one is gone already too.
                break
            num_scheduled_tokens[request.request_id] = num_new_tokens
            new_blocks_of[request.request_id] = [b.block_id for b in new_blocks]
            token_budget -= num_new_tokens
            req_index += 1
        # Not to fill a step that has other running requests: a decode ahead makes the first stage
        # wait for the last to sample, which would stall the other micro-batches in flight.
        if (micro_batching and not num_scheduled_tokens and self.scheduler_config.async_scheduling
                and self._num_requests_reading_outputs == 0):
            for request in pending_requests:
                if token_budget == 0 or len(num_scheduled_tokens) >= max_running:
                    break
                # One decode ahead of the newest pending token, unless the tokens being sampled end
                # the request; never preempting for it (a request this step holds could be the victim).
                if (request.status != RequestStatus.RUNNING or self._reaches_length_limit(request)
                        or request.num_tokens + request.num_output_placeholders - request.num_computed_tokens != 1):
                    continue
                new_blocks = self.kv_cache_manager.allocate_slots(request, 1)
                if new_blocks is None:
                    break
                num_scheduled_tokens[request.request_id] = 1
                new_blocks_of[request.request_id] = [b.block_id for b in new_blocks]
                token_budget -= 1

        # Then waiting requests, FCFS, unless this step already had to preempt (the pool is full).
        # Parallel samples waiting for their sibling's prompt are passed over, keeping their place.
        passed_over: list[Request] = []
        new_req_ids: set[str] = set()
        while (self.waiting and not preempted_any and token_budget > 0
               and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]
            if request.num_output_placeholders > 0:
                # Preempted while a step that samples its next token is still in flight (possible
                # with several micro-batches in flight): it resumes once that token is in.
                passed_over.append(self.waiting.popleft())
                continue
            must_wait, fork_source = self._get_fork_source(request, new_req_ids)
            if must_wait:
                passed_over.append(self.waiting.popleft())
                continue
            computed_blocks, num_computed_tokens = self.kv_cache_manager.get_computed_blocks(request, fork_source)
            num_tokens_left = request.num_tokens - num_computed_tokens
            if not self.scheduler_config.enable_chunked_prefill and num_tokens_left > token_budget:
                break
            num_new_tokens = min(num_tokens_left, token_budget)
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new_tokens, computed_blocks,
                                                              num_computed_tokens)
            if new_blocks is None:
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_computed_tokens
                if self.kv_cache_manager.enable_caching:
                    self.num_prefix_cache_queries += request.num_tokens
                    self.num_prefix_cache_hits += num_computed_tokens
            request.num_computed_tokens = num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            new_reqs.append(request)
            new_req_ids.add(request.request_id)
            num_scheduled_tokens[request.request_id] = num_new_tokens
            token_budget -= num_new_tokens
        self.waiting.extendleft(reversed(passed_over))

        scheduler_output = self._make_output(new_reqs, num_scheduled_tokens, new_blocks_of)
        # Advance progress now that the output recorded the pre-step values: the next
        # schedule() must not hand out the same tokens again, even before this step's results.
        # A request whose tokens reach its end samples one: a placeholder until the result is in.
        for req_id, num_tokens in num_scheduled_tokens.items():
            request = self.requests[req_id]
            request.num_computed_tokens += num_tokens
            if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1
        return scheduler_output

    def _reaches_length_limit(self, request: Request) -> bool:
        """True when the tokens still being sampled take the request to max_tokens or max_model_len."""
        pending = request.num_output_placeholders
        return pending > 0 and (request.num_output_tokens + pending >= request.max_tokens
                                or request.num_tokens + pending >= self.max_model_len)

    def can_schedule_ahead(self) -> bool:
        """Whether step N+1 may be scheduled before step N's sampled tokens are known.

        Not while an unfinished request's sampling reads its previous tokens' values on the host
        (penalties, logits processors): the runner would see placeholders. Always with
        micro-batches, which never schedule a request before its token is in.
        """
        return self.max_concurrent_batches > 1 or self._num_requests_reading_outputs == 0

    def _get_fork_source(self, request: Request, new_req_ids: set[str]) -> tuple[bool, Request | None]:
        """For a parallel sample: (must it wait, the running sibling whose prompt blocks it forks).

        The sibling's blocks can be forked once it has computed all but the last prompt token
        in an earlier step (the partial block is copied, so its K/V must exist before this
        step). Until then the sample waits, rather than prefilling the same prompt again. A
        sibling that finished or was aborted left its blocks in the prefix cache instead.
        """
        if (request.fork_source_id is None or not self.kv_cache_manager.enable_caching
                or request.num_prompt_tokens <= 1):
            return False, None
        source = self.requests.get(request.fork_source_id)
        if source is None or source.sampling_params.prompt_logprobs is not None:
            return False, None
        if (source.status == RequestStatus.RUNNING and source.request_id not in new_req_ids
                and source.num_computed_tokens >= request.num_prompt_tokens - 1):
            return False, source
        return True, None

    def _preempt(self, request: Request) -> None:
        """Drop a running request's cache and requeue it at the front for recomputation."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.finished_req_ids.add(request.request_id)

    def _make_output(
        self,
        new_reqs: list[Request],
        num_scheduled_tokens: dict[str, int],
        new_blocks_of: dict[str, list[int]],
    ) -> SchedulerOutput:
        new_req_ids = {request.request_id for request in new_reqs}
        scheduled_new_reqs = [
            NewRequestData(
                req_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
                num_computed_tokens=request.num_computed_tokens,
            )
            for request in new_reqs
        ]
        cached = [self.requests[req_id] for req_id in num_scheduled_tokens if req_id not in new_req_ids]
        last_tokens = self.scheduler_config.include_last_token_ids
        scheduled_cached_reqs = [
            CachedRequestData(
                req_id=request.request_id,
                new_block_ids=new_blocks_of[request.request_id],
                num_computed_tokens=request.num_computed_tokens,
                # A decode of its newest known token (not of a prefill chunk, nor ahead of one).
                last_token_id=(request.all_token_ids[-1]
                               if last_tokens and request.num_computed_tokens == request.num_tokens - 1 else None),
            )
            for request in cached
        ]
        # Ahead: its input is a token still being sampled (one the scheduler does not know).
        decode_ahead_req_ids = ([r.request_id for r in cached if r.num_computed_tokens >= r.num_tokens]
                                if last_tokens else [])
        output = SchedulerOutput(
            scheduled_new_reqs=scheduled_new_reqs,
            scheduled_cached_reqs=scheduled_cached_reqs,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=sum(num_scheduled_tokens.values()),
            finished_req_ids=self.finished_req_ids,
            blocks_to_copy=self.kv_cache_manager.take_blocks_to_copy(),
            decode_ahead_req_ids=decode_ahead_req_ids,
        )
        self.finished_req_ids = set()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, check stop conditions, free finished requests; one output each.

        A request gets an EngineCoreOutput when it gained tokens or prompt logprobs or finished.
        Requests finished from outside since schedule() (aborts) are skipped.
        """
        outputs: list[EngineCoreOutput] = []
        finished: set[str] = set()
        request_errors = model_runner_output.request_errors
        for req_id, sampled_token_ids in zip(model_runner_output.req_ids,
                                             model_runner_output.sampled_token_ids):
            request = self.requests.get(req_id)
            # WAITING: a new request reusing the id of one aborted while this step ran. No
            # placeholder: not the request that sampled (same reason).
            if (request is None or request.status not in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)
                    or (sampled_token_ids and request.num_output_placeholders == 0)):
                continue
            if sampled_token_ids:
                request.num_output_placeholders -= 1
            # Preempted after this step was launched (async scheduling): its token still counts,
            # its prompt logprobs will be computed again when it resumes.
            preempted = request.status == RequestStatus.PREEMPTED
            new_token_ids: list[int] = []
            error = request_errors.get(req_id)
            if error is not None:
                # Failed alone in the runner (its logits processor raised): its token is dropped.
                request.status, request.error = RequestStatus.FINISHED_ERROR, error
            for token_id in sampled_token_ids if error is None else ():
                request.append_output_token_ids([token_id])
                new_token_ids.append(token_id)
                if self._check_stop(request):
                    break  # tokens after a stop are discarded
            new_logprobs = model_runner_output.logprobs.get(req_id)
            if new_logprobs is not None and len(new_token_ids) < len(sampled_token_ids):
                new_logprobs = _first_rows(new_logprobs, len(new_token_ids))
            new_prompt_logprobs = None if preempted else model_runner_output.prompt_logprobs.get(req_id)
            if request.is_finished():
                if preempted:
                    self.waiting.remove(request)
                else:
                    finished.add(req_id)
                self.finished_req_ids.add(req_id)
                self._free_request(request)
            if new_token_ids or new_prompt_logprobs is not None or request.is_finished():
                outputs.append(EngineCoreOutput(
                    req_id=req_id,
                    new_token_ids=new_token_ids,
                    new_logprobs=new_logprobs,
                    new_prompt_logprobs=new_prompt_logprobs,
                    finish_reason=request.get_finish_reason(),
                    stop_reason=request.stop_reason,
                    num_cached_tokens=request.num_cached_tokens,
                    error=request.error,
                ))
        if finished:
            self.running = [r for r in self.running if r.request_id not in finished]
        return outputs

    def _check_stop(self, request: Request) -> bool:
        """Set a finished status if the last appended token ends the request.

        A stop token wins over the length limits when both hold, so a model that ends its answer
        with EOS as its last allowed token reports "stop".
        """
        params = request.sampling_params
        last_token_id = request.output_token_ids[-1]
        if (request.num_output_tokens >= params.min_tokens
                and last_token_id in params.all_stop_token_ids):
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = last_token_id if last_token_id in params.stop_token_ids else None
            return True
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False


def _reads_output_tokens(request: Request) -> bool:
    """Whether the request's sampling reads the values of its earlier output tokens."""
    params = request.sampling_params
    return bool(params.logits_processors or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


def _first_rows(logprobs: LogprobsLists, num_rows: int) -> LogprobsLists:
    """The logprobs of the first `num_rows` tokens only."""
    return LogprobsLists(
        token_ids=logprobs.token_ids[:num_rows],
        logprobs=logprobs.logprobs[:num_rows],
        ranks=logprobs.ranks[:num_rows],
    )
