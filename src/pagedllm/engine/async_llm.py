"""AsyncLLM: the asyncio front of the engine used by the server; the engine core runs in its own process.

This process keeps the tokenizer, the InputProcessor and the OutputProcessor (detokenization,
stop strings, n > 1 gathering). One background task takes the core's per-step messages, runs
the OutputProcessor and feeds one asyncio queue per request; `generate()` reads its queue. A
request whose consumer goes away (client disconnect, task cancelled) is aborted, and the core
frees its blocks before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from pagedllm.config import EngineArgs, EngineConfig, create_engine_config
from pagedllm.engine.beam_search import BeamSearchInstance, beam_search_request_output
from pagedllm.engine.core_client import EngineCoreClient, EngineCoreMessage, EngineDeadError
from pagedllm.engine.core_proc import EngineCoreFailure, EngineCoreOutputs, EngineCoreReady
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagedllm.engine.output_processor import OutputProcessor, RequestState
from pagedllm.engine.request_fanout import make_engine_core_requests, model_eos_token_ids
from pagedllm.engine.stats import IterationStats, StatLogger
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams
from pagedllm.tokenizer import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

# What a request's queue carries: its outputs, or the error that ended it.
QueueItem = RequestOutput | BaseException


def summarize_failure(message: str) -> str:
    """The first and last lines of an engine-core failure report: what a client may see.

    The core's report holds a full traceback; that goes to the log, never into a response.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "The engine core failed."
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


class AsyncLLM:
    """Async generation over an engine core in a child process (continuous batching across callers).

    Bound to the event loop that first uses it.
    """

    def __init__(self, config: EngineConfig, log_level: int = logging.WARNING,
                 stat_loggers: list[StatLogger] | None = None) -> None:
        self.config = config
        model_config = config.model_config
        # Start the core first: it loads the model while this process builds the tokenizer.
        self.engine_core = EngineCoreClient(config, log_level)
        try:
            self.tokenizer: Tokenizer | None = get_tokenizer(model_config.tokenizer) if model_config.tokenizer else None
            self.eos_token_ids = model_eos_token_ids(model_config, self.tokenizer)
            self.input_processor = InputProcessor(self.tokenizer, model_config.max_model_len, model_config.vocab_size)
            self.output_processor = OutputProcessor(self.tokenizer)
            self.kv_cache_info: EngineCoreReady = self.engine_core.wait_until_ready()
        except BaseException:
            self.engine_core.shutdown()
            raise
        # The core sized the pool in its own process; keep this copy of the config in step.
        config.cache_config.num_blocks = self.kv_cache_info.num_blocks
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        self.request_queues: dict[str, asyncio.Queue[QueueItem]] = {}
        self.dead_error: EngineDeadError | None = None
        # Called once, on the event loop, when the engine core dies (the server then exits).
        self.on_dead: Callable[[EngineDeadError], None] | None = None
        self._messages: asyncio.Queue[EngineCoreMessage] | None = None
        self._output_handler: asyncio.Task[None] | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, log_level: int = logging.WARNING,
                         stat_loggers: list[StatLogger] | None = None) -> "AsyncLLM":
        """Validate the engine arguments, start the engine core and wait until it is ready."""
        return cls(create_engine_config(engine_args), log_level=log_level, stat_loggers=stat_loggers)

    # ---- public API ---------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """The context limit (prompt + output tokens) of every request."""
        return self.config.model_config.max_model_len

    @property
    def is_running(self) -> bool:
        """True while the engine core is alive and healthy."""
        return self.dead_error is None and self.engine_core.is_alive()

    @property
    def num_unfinished_requests(self) -> int:
        """Engine-core requests queued or running (each of the n samples of a request counts)."""
        return self.output_processor.get_num_unfinished_requests()

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine core is gone."""
        if self.dead_error is not None:
            raise self.dead_error
        if not self.engine_core.is_alive():
            raise EngineDeadError(f"The engine core process exited (exit code {self.engine_core.process.exitcode}).")

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer; an error if the engine runs without one."""
        if self.tokenizer is None:
            raise ValueError("This engine has no tokenizer (it was started with --skip-tokenizer-init).")
        return self.tokenizer

    def start(self) -> None:
        """Start the output handler on the running event loop (done lazily by generate() too)."""
        if self._output_handler is not None:
            return
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[EngineCoreMessage] = asyncio.Queue()
        self._messages = messages

        def deliver(message: EngineCoreMessage) -> None:  # runs on the reader thread
            try:
                loop.call_soon_threadsafe(messages.put_nowait, message)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        self.engine_core.start_output_thread(deliver)
        self._output_handler = loop.create_task(self._run_output_handler(), name="AsyncLLM.output_handler")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> asyncio.Queue[QueueItem]:
        """Validate and queue a request; its outputs arrive on the returned queue. Raises ValueError."""
        self.start()
        self.check_health()
        if request_id in self.request_queues:
            raise ValueError(f"Request id {request_id!r} is already running; request ids must be unique.")
        if params.logits_processors:
            # Callables cannot travel to the engine-core process (nor would a server accept them).
            raise ValueError("logits_processors are only supported by the offline LLM API.")
        processed = self.input_processor.process(prompt, params)
        requests = make_engine_core_requests(request_id, processed, params, time.monotonic(), self.eos_token_ids,
                                             self.max_model_len, self.output_processor)
        queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        self.request_queues[request_id] = queue
        for request in requests:
            self.engine_core.add_request(request)
        return queue

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced (per `sampling_params.output_kind`).

        Ends after the finished output. If the caller stops iterating early or is cancelled, the
        request is aborted. Raises ValueError for invalid input and EngineDeadError if the core dies.
        """
        queue = self.add_request(request_id, prompt, sampling_params)
        async for output in self.stream_outputs(request_id, queue):
            yield output

    async def stream_outputs(self, request_id: str, queue: asyncio.Queue[QueueItem]) -> AsyncIterator[RequestOutput]:
        """Yield the outputs of a request queued by add_request(); aborts it if abandoned early."""
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the request is gone already: nothing to abort
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort_now(request_id)

    def beam_search(self, prompt: PromptType, params: BeamSearchParams,
                    request_id: str) -> AsyncIterator[RequestOutput]:
        """Validate a beam search now (ValueError); the returned iterator runs it and yields one output.

        That finished RequestOutput holds the best sequences, best first, as `outputs` (vLLM's
        shape) and the prompt's prefix-cache hits. Each step queues one request per live beam
        (ids `{request_id}-s{step}-b{beam}`) together, so they run in one engine step and share
        their blocks through the prefix cache. Abandoning the iterator aborts the step's requests.
        """
        self.start()
        self.check_health()
        processed = self.input_processor.process(prompt, SamplingParams(max_tokens=1))
        search = BeamSearchInstance(processed.prompt_token_ids, params, self.eos_token_ids, self.max_model_len,
                                    cache_salt=processed.cache_salt)
        return self._run_beam_search(request_id, processed, search)

    async def _run_beam_search(self, request_id: str, processed: ProcessedPrompt,
                               search: BeamSearchInstance) -> AsyncIterator[RequestOutput]:
        num_cached_tokens: int | None = None
        step = 0
        while not search.done:
            sub_ids: list[str] = []
            try:
                queues = []
                for beam, (beam_prompt, beam_params) in enumerate(search.step_requests()):
                    sub_id = f"{request_id}-s{step}-b{beam}"
                    queues.append(self.add_request(sub_id, beam_prompt, beam_params))
                    sub_ids.append(sub_id)
                outputs: list[RequestOutput] = []
                for sub_id, queue in zip(sub_ids, queues):
                    async for output in self.stream_outputs(sub_id, queue):
                        if output.finished:
                            outputs.append(output)
            except BaseException:
                for sub_id in sub_ids:
                    self.abort_now(sub_id)
                raise
            if num_cached_tokens is None:
                num_cached_tokens = outputs[0].num_cached_tokens  # the first step looks up the prompt
            search.update_from_outputs(outputs)
            step += 1
        yield beam_search_request_output(request_id, processed.prompt, processed.prompt_token_ids,
                                         search.results(self.tokenizer), num_cached_tokens or 0)

    async def abort(self, request_id: str) -> None:
        """Stop a request (its id as given to generate()); its blocks are freed within one engine step."""
        self.abort_now(request_id)

    def abort_all(self, error: BaseException) -> int:
        """Abort every running request; each one's consumer gets `error`. Returns how many there were."""
        request_ids = list(self.request_queues)
        for request_id in request_ids:
            queue = self.request_queues.get(request_id)
            self.abort_now(request_id)
            if queue is not None:
                queue.put_nowait(error)
        return len(request_ids)

    def shutdown(self) -> None:
        """Stop the output handler and the engine-core process."""
        if self._output_handler is not None:
            self._output_handler.cancel()
        self.engine_core.shutdown()

    # ---- output handling ------------------------------------------------------------------------

    async def _run_output_handler(self) -> None:
        assert self._messages is not None
        while True:
            message = await self._messages.get()
            if isinstance(message, EngineCoreFailure):
                self._fail_all(EngineDeadError(summarize_failure(message.message)))
                return
            try:
                self._process_outputs(message)
            except Exception as e:
                logger.exception("Processing engine-core outputs failed")
                self._fail_all(EngineDeadError(f"Processing engine-core outputs failed: {e!r}"))
                self.engine_core.shutdown()
                return

    def _process_outputs(self, message: EngineCoreOutputs) -> None:
        """Run one core message through the output processor and hand the results to their requests."""
        now = time.monotonic()
        states = self.output_processor.request_states
        for req_id, scheduled_time in message.first_scheduled_times.items():
            state = states.get(req_id)
            if state is not None:
                state.metrics.first_scheduled_time = scheduled_time
                parent = state.parent
                if parent is not None and parent.metrics.first_scheduled_time is None:
                    parent.metrics.first_scheduled_time = scheduled_time
        iteration = IterationStats()
        touched: list[RequestState] = []
        for out in message.outputs:
            state = states.get(out.req_id)
            if state is not None:  # None: aborted while the step ran
                iteration.observe_output(state, out, now)
                touched.append(state)
        processed = self.output_processor.process_outputs(message.outputs, now)
        for request_output in processed.request_outputs:
            queue = self.request_queues.get(request_output.request_id)
            if queue is not None:
                queue.put_nowait(request_output)
            if request_output.finished:
                self.request_queues.pop(request_output.request_id, None)
        # Stop strings are found here, after the core already moved on: tell it to finish them.
        self.engine_core.finish_requests_stopped(processed.reqs_to_abort)
        for state in touched:
            if state.finished:
                iteration.observe_finished(state)
        for req_id, error in message.request_errors.items():
            self._fail_request(req_id, ValueError(error))
        for stat_logger in self.stat_loggers:
            stat_logger.record(message.scheduler_stats, iteration)

    def _user_request_id(self, core_id: str) -> str:
        state = self.output_processor.request_states.get(core_id)
        if state is not None and state.parent is not None:
            return state.parent.request_id
        return core_id

    def _fail_request(self, core_id: str, error: BaseException) -> None:
        request_id = self._user_request_id(core_id)
        queue = self.request_queues.pop(request_id, None)
        self.abort_now(request_id)
        if queue is not None:
            queue.put_nowait(error)

    def _fail_all(self, error: EngineDeadError) -> None:
        logger.error("%s", error)
        self.dead_error = error
        queues, self.request_queues = self.request_queues, {}
        for queue in queues.values():
            queue.put_nowait(error)
        if self.on_dead is not None:
            self.on_dead(error)

    def abort_now(self, request_id: str) -> None:
        """abort() without awaiting: safe inside a cancelled task or a closing generator."""
        processor = self.output_processor
        parent = processor.parent_requests.get(request_id)
        core_ids = parent.child_ids if parent is not None else [request_id]
        dropped_states = [processor.request_states[i] for i in core_ids if i in processor.request_states]
        aborted = processor.abort_requests([request_id])
        self.request_queues.pop(request_id, None)
        if self.dead_error is None:
            self.engine_core.abort_requests(aborted)
        if dropped_states and self.stat_loggers:
            iteration = IterationStats()
            for state in dropped_states:
                iteration.observe_aborted(state)
            for stat_logger in self.stat_loggers:
                stat_logger.record(None, iteration)
