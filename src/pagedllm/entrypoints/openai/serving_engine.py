"""What the completion and chat handlers share: errors, model checks, sampling params, stream plumbing."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.engine.input_processor import PromptType
from pagedllm.entrypoints.openai.protocol import (
    ErrorInfo,
    ErrorResponse,
    PromptTokenUsageInfo,
    SamplingRequestFields,
    UsageInfo,
)
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from pagedllm.tokenizer import Tokenizer

T = TypeVar("T")
logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error"}
# The API's floor for -inf logprobs (JSON has no infinity).
MIN_LOGPROB = -9999.0
# What a 503 for a full queue asks clients to wait before retrying, in seconds.
RETRY_AFTER_S = 1


@dataclass
class RequestLimits:
    """The server's per-request policies (flags of `pagedllm serve`)."""

    # Engine-core requests that may wait beyond the running batch (max_num_seqs); more -> 503.
    max_waiting_requests: int = 1024
    # Seconds from arrival after which a request is aborted (None: no limit).
    request_timeout: float | None = None
    # Log every request's prompt and parameters (off: prompts never reach the log).
    log_requests: bool = False


class OpenAIError(Exception):
    """An error to return in OpenAI's shape; raised anywhere in a handler, rendered by the app."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.headers = headers

    def to_body(self) -> ErrorResponse:
        """The `{"error": {...}}` body."""
        default = "server_error" if self.status_code >= 500 else "invalid_request_error"
        err_type = _ERROR_TYPES.get(self.status_code, default)
        return ErrorResponse(error=ErrorInfo(message=self.message, type=err_type, param=self.param, code=self.code))

    def to_response(self) -> JSONResponse:
        """The HTTP response carrying this error."""
        return JSONResponse(self.to_body().model_dump(), status_code=self.status_code, headers=self.headers)


def bad_request_from(error: ValueError, default_param: str | None, fields: set[str]) -> OpenAIError:
    """A 400 from a validation ValueError; its param is the field the message starts with, if any."""
    message = str(error)
    match = re.match(r"[A-Za-z_]+", message)
    param = match.group(0) if match and match.group(0) in fields else default_param
    return OpenAIError(message, 400, param=param)


def sse_event(payload: str) -> str:
    """One Server-Sent Event carrying a JSON payload."""
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def as_openai_error(error: Exception) -> OpenAIError:
    """An error raised while a request ran, as the OpenAI error to report (503 once the engine is dead)."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, EngineDeadError):
        return OpenAIError(f"The engine is dead: {error}", 503, code="engine_dead")
    if isinstance(error, ValueError):
        return OpenAIError(str(error), 400)
    # The traceback goes to the log only: error bodies never show the server's internals.
    logger.error("Request failed", exc_info=error)
    return OpenAIError("Internal server error.", 500)


def check_failed_output(output: RequestOutput) -> None:
    """500 when a sequence of the output failed alone in the engine (finish_reason "error")."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            raise OpenAIError(f"The request failed: {completion.error or 'unknown error'}", 500,
                              code="request_failed")


def request_timeout_error(timeout: float) -> OpenAIError:
    """The 504 of a request that ran past --request-timeout (and was aborted)."""
    return OpenAIError(f"The request did not finish within the server's limit of {timeout:g} s "
                       "(--request-timeout) and was aborted.", 504, code="request_timeout")


async def with_deadline(iterator: AsyncIterator[T], deadline: float, timeout: float) -> AsyncIterator[T]:
    """The items of `iterator` until the event loop's clock reaches `deadline`, then a 504.

    Closing the source on the way out aborts its engine request, which frees its blocks.
    """
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(iterator)  # type: ignore[call-overload]
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise request_timeout_error(timeout) from None
            yield item
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]


def stream_error_event(error: Exception) -> str:
    """The SSE event that reports an error in the middle of a stream (a [DONE] event follows it)."""
    return sse_event(as_openai_error(error).to_body().model_dump_json())


class OpenAIServing:
    """Base of the endpoint handlers: the engine, the served names and request validation."""

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], max_logprobs: int,
                 limits: RequestLimits | None = None) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.max_logprobs = max_logprobs
        self.max_model_len = engine.max_model_len
        self.enable_prefix_caching = engine.config.cache_config.enable_prefix_caching
        self.limits = limits or RequestLimits()
        # Engine-core requests admitted at once: the running batch plus the waiting queue.
        self.max_admitted = engine.config.scheduler_config.max_num_seqs + self.limits.max_waiting_requests

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer; 400 when the server runs without one (--skip-tokenizer-init)."""
        if self.engine.tokenizer is None:
            raise OpenAIError("This server runs without a tokenizer (--skip-tokenizer-init), so it cannot "
                              "tokenize text, render chats or return text.", 400)
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        """404 unless `model` (when given) is one of the served names."""
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(f"The model `{model}` does not exist. This server serves: "
                              f"{', '.join(self.served_model_names)}.", 404, param="model", code="model_not_found")

    def check_engine(self) -> None:
        """503 while the engine core is dead."""
        if not self.engine.is_running:
            raise OpenAIError("The engine core is not running; the server cannot serve requests.", 503,
                              code="engine_dead")

    def check_admission(self, num_sequences: int, param: str) -> None:
        """Admission control: 400 for a request larger than the server ever admits, 503 when full.

        A request of `num_sequences` engine-core requests (prompts x n, or the beam width) is
        admitted while the running batch plus the waiting queue stays within max_num_seqs +
        --max-waiting-requests; beyond, the client is told to retry instead of queueing without bound.
        """
        limit = self.max_admitted
        if num_sequences > limit:
            raise OpenAIError(f"This request needs {num_sequences} sequences (prompts x n, or the beam width), more "
                              f"than this server ever runs or queues at once ({limit}).", 400, param=param)
        if self.engine.num_unfinished_requests + num_sequences > limit:
            raise OpenAIError(f"The server is overloaded: {self.engine.num_unfinished_requests} sequences are running "
                              f"or waiting, the most it queues is {limit} (--max-waiting-requests). Retry later.",
                              503, code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})

    def deadline_of(self, arrival: float) -> float | None:
        """The event-loop time at which a request that arrived at `arrival` is aborted (None: never)."""
        timeout = self.limits.request_timeout
        return None if timeout is None else arrival + timeout

    def log_request(self, request_id: str, prompts: list[PromptType], params: Any) -> None:
        """With --log-requests, the request's prompts and parameters go to the log (never otherwise)."""
        if self.limits.log_requests:
            logger.info("Received request %s: prompts: %r, params: %s", request_id, prompts, params)

    @staticmethod
    def check_stream_options(request: SamplingRequestFields) -> None:
        """400 for stream_options without stream."""
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed when stream is true.", 400, param="stream_options")

    def check_logprobs(self, num_logprobs: int | None, param: str) -> None:
        """400 for more logprobs than --max-logprobs allows (or a negative number)."""
        if num_logprobs is None:
            return
        if num_logprobs < 0:
            raise OpenAIError(f"{param} must be a non-negative integer, got {num_logprobs}.", 400, param=param)
        if num_logprobs > self.max_logprobs:
            raise OpenAIError(f"{param}={num_logprobs} exceeds the maximum allowed value of {self.max_logprobs} "
                              "(the server's --max-logprobs).", 400, param=param)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str,
                     max_tokens_param: str = "max_tokens") -> None:
        """400 when the prompt plus max_tokens does not fit max_model_len."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens, and the prompt has "
                              f"{num_prompt_tokens} tokens, leaving no room for a completion. Please shorten the "
                              f"{prompt_param}.", 400, param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {prompt_param}, "
                              f"{max_tokens} for the completion). Please reduce the length of the {prompt_param} "
                              f"or {max_tokens_param}.", 400, param=max_tokens_param, code="context_length_exceeded")

    @staticmethod
    def check_best_of(request: SamplingRequestFields) -> None:
        """400 unless best_of is unset, equals n, or is a beam width of at least n (with use_beam_search)."""
        if request.best_of is None:
            return
        if not request.use_beam_search and request.best_of != request.n:
            raise OpenAIError("best_of is only supported with use_beam_search (as the beam width) or equal to n.",
                              400, param="best_of")
        if request.use_beam_search and request.best_of < request.n:
            raise OpenAIError(f"best_of (the beam width) must be at least n={request.n}, got {request.best_of}.",
                              400, param="best_of")

    @staticmethod
    def make_prompt(text: str | None, token_ids: list[int], request: SamplingRequestFields) -> PromptType:
        """The engine prompt dict of one prompt, with the request's cache_salt."""
        prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": token_ids}
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        return prompt

    def make_usage(self, num_prompt_tokens: int, num_generated_tokens: int, num_cached_tokens: int) -> UsageInfo:
        """The usage block; `prompt_tokens_details.cached_tokens` when prefix caching is on."""
        details = PromptTokenUsageInfo(cached_tokens=num_cached_tokens) if self.enable_prefix_caching else None
        return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_generated_tokens,
                         total_tokens=num_prompt_tokens + num_generated_tokens, prompt_tokens_details=details)

    def make_beam_search_params(self, request: SamplingRequestFields, max_tokens: int | None,
                                logprobs_param: str | None) -> BeamSearchParams:
        """BeamSearchParams of a use_beam_search request (width best_of or n); 400 for what it cannot honour.

        `logprobs_param` names the request's logprobs field when the request asks for logprobs.
        Sampling fields (temperature, top_p, seed, penalties, ...) do not apply to beam search.
        """
        if logprobs_param is not None:
            raise OpenAIError(f"{logprobs_param} is not supported with use_beam_search.", 400, param=logprobs_param)
        for name in ("stop", "stop_token_ids"):
            if getattr(request, name):
                raise OpenAIError(f"{name} is not supported with use_beam_search.", 400, param=name)
        if request.n < 1:
            raise OpenAIError(f"n must be at least 1, got {request.n}.", 400, param="n")
        try:
            return BeamSearchParams(
                beam_width=request.best_of if request.best_of is not None else request.n,
                # None: as much as max_model_len leaves (the search stops there anyway).
                max_tokens=max_tokens if max_tokens is not None else self.max_model_len,
                ignore_eos=request.ignore_eos,
                length_penalty=request.length_penalty,
                early_stopping=request.early_stopping,
            )
        except ValueError as e:
            raise bad_request_from(e, None, set(type(request).model_fields)) from e

    @staticmethod
    def make_sampling_params(request: SamplingRequestFields, max_tokens: int | None, logprobs: int | None,
                             prompt_logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams (DELTA outputs when streaming); 400 naming a bad field."""

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        try:
            return SamplingParams(
                n=request.n,
                presence_penalty=pick(request.presence_penalty, 0.0),
                frequency_penalty=pick(request.frequency_penalty, 0.0),
                repetition_penalty=pick(request.repetition_penalty, 1.0),
                temperature=pick(request.temperature, 1.0),
                top_p=pick(request.top_p, 1.0),
                top_k=pick(request.top_k, 0),
                min_p=pick(request.min_p, 0.0),
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                logit_bias=request.logit_bias,
                output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
            )
        except ValueError as e:
            raise bad_request_from(e, None, set(type(request).model_fields)) from e

    def add_requests(self, request_id: str, prompts: list[PromptType], params: SamplingParams,
                     prompt_param: str, fields: set[str],
                     deadline: float | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Queue one engine request per prompt (ids `{request_id}-{i}`); all or none (400 on bad input).

        With a `deadline` (event-loop time) each stream ends in a 504 once it passes.
        """
        self.check_engine()
        self.check_admission(len(prompts) * params.n, "n" if params.n > 1 else prompt_param)
        self.log_request(request_id, prompts, params)
        added: list[str] = []
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for i, prompt in enumerate(prompts):
                sub_id = f"{request_id}-{i}"
                queue = self.engine.add_request(sub_id, prompt, params)
                added.append(sub_id)
                streams.append(self.engine.stream_outputs(sub_id, queue))
        except ValueError as e:
            self.abort_all(added)
            raise bad_request_from(e, prompt_param, fields) from e
        return self._with_deadline(streams, deadline)

    def start_beam_searches(self, request_id: str, prompts: list[PromptType], params: BeamSearchParams, n: int,
                            prompt_param: str, fields: set[str],
                            deadline: float | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Start one beam search per prompt (ids `{request_id}-{i}`); each yields one output of its n best beams."""
        self.check_engine()
        self.check_admission(len(prompts) * params.beam_width, "best_of")
        self.log_request(request_id, prompts, params)
        try:
            searches = [self.engine.beam_search(prompt, params, f"{request_id}-{i}")
                        for i, prompt in enumerate(prompts)]
        except ValueError as e:
            raise bad_request_from(e, prompt_param, fields) from e
        return self._with_deadline([_best_beams(search, n) for search in searches], deadline)

    def _with_deadline(self, streams: list[AsyncIterator[RequestOutput]],
                       deadline: float | None) -> list[AsyncIterator[RequestOutput]]:
        if deadline is None or self.limits.request_timeout is None:
            return streams
        return [with_deadline(stream, deadline, self.limits.request_timeout) for stream in streams]

    def abort_all(self, request_ids: list[str]) -> None:
        """Abort requests that may still run (finished or unknown ids are ignored)."""
        for request_id in request_ids:
            self.engine.abort_now(request_id)


async def _best_beams(search: AsyncIterator[RequestOutput], n: int) -> AsyncIterator[RequestOutput]:
    """A beam search's output with only its n best sequences."""
    async for output in search:
        yield dataclasses.replace(output, outputs=output.outputs[:n])


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (index, item) from several async iterators as items arrive; cancels them all on exit."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((index, item))
        except Exception as e:  # handed to the consumer; cancellation just ends the task
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, finished))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def run_unless_disconnected(raw_request: Request, handler: Callable[[], Awaitable[T]]) -> T | None:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client leaves."""

    async def wait_for_disconnect() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(handler())
    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        return None
    return work.result()
