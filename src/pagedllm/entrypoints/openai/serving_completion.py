"""POST /v1/completions: prompts (text or token ids, one or many) -> completions, streamed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from pagedllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    random_id,
)
from pagedllm.entrypoints.openai.serving_engine import (
    MIN_LOGPROB,
    SSE_DONE,
    OpenAIError,
    OpenAIServing,
    as_openai_error,
    check_failed_output,
    merge_async_iterators,
    sse_event,
    stream_error_event,
)
from pagedllm.outputs import CompletionOutput, PromptLogprobs, RequestOutput, SampleLogprobs
from pagedllm.tokenizer import Tokenizer

def completion_logprobs(token_ids: list[int], logprobs: SampleLogprobs | PromptLogprobs, tokenizer: Tokenizer,
                        text_offset: int) -> CompletionLogProbs:
    """Legacy-format logprobs of some tokens; a None entry (the prompt's first token) has no logprob."""
    result = CompletionLogProbs()
    offset = text_offset
    for token_id, entry in zip(token_ids, logprobs):
        token = tokenizer.id_to_text(token_id)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        sampled = entry.get(token_id)
        result.token_logprobs.append(max(sampled.logprob, MIN_LOGPROB) if sampled is not None else None)
        top: dict[str, float] = {}
        for tid, lp in entry.items():
            text = lp.decoded_token if lp.decoded_token is not None else tokenizer.id_to_text(tid)
            top[text] = max(lp.logprob, MIN_LOGPROB)
        result.top_logprobs.append(top)
    return result


def _merge_logprobs(first: CompletionLogProbs, second: CompletionLogProbs) -> CompletionLogProbs:
    return CompletionLogProbs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )


class OpenAIServingCompletion(OpenAIServing):
    """Handles /v1/completions."""

    async def create_completion(self, request: CompletionRequest) -> Response:
        """Validate, queue every prompt, and return the JSON response or the SSE stream."""
        deadline = self.deadline_of(asyncio.get_running_loop().time())
        self.check_model(request.model)
        self.check_stream_options(request)
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported by this server.", 400, param="suffix")
        self.check_best_of(request)
        self.check_logprobs(request.logprobs, "logprobs")
        tokenizer = self.get_tokenizer()
        prompts = self._prompts_of(request, tokenizer)
        for _, ids in prompts:
            self.check_length(len(ids), request.max_tokens, "prompt")
        request_id = random_id("cmpl")
        engine_prompts = [self.make_prompt(text, ids, request) for text, ids in prompts]
        fields = set(CompletionRequest.model_fields)
        if request.use_beam_search:
            beam_params = self.make_beam_search_params(request, request.max_tokens,
                                                       "logprobs" if request.logprobs is not None else None)
            streams = self.start_beam_searches(request_id, engine_prompts, beam_params, request.n, "prompt", fields,
                                               deadline)
        else:
            prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
            params = self.make_sampling_params(request, request.max_tokens, request.logprobs, prompt_logprobs)
            streams = self.add_requests(request_id, engine_prompts, params, "prompt", fields, deadline)
        sub_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        # Only echo shows the prompt; a token-id prompt is then decoded (with its special tokens).
        prompt_texts = [(text if text is not None else tokenizer.decode(ids, skip_special_tokens=False))
                        if request.echo else "" for text, ids in prompts]
        if request.stream:
            generator = self._stream(request, request_id, streams, prompt_texts, [len(ids) for _, ids in prompts])
            return StreamingResponse(generator, media_type="text/event-stream",
                                     background=BackgroundTask(self.abort_all, sub_ids))
        try:
            finals: list[RequestOutput | None] = [None] * len(prompts)
            async for index, output in merge_async_iterators(streams):
                check_failed_output(output)
                finals[index] = output
        except ValueError as e:  # refused by the engine core after queueing
            raise as_openai_error(e) from e
        finally:
            self.abort_all(sub_ids)
        response = self._make_response(request, request_id, finals, prompt_texts)
        return JSONResponse(response.model_dump())

    @staticmethod
    def _prompts_of(request: CompletionRequest, tokenizer: Tokenizer) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) of every prompt in the request."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise OpenAIError("prompt must not be empty.", 400, param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        prompts: list[tuple[str | None, list[int]]] = []
        for item in items:
            if isinstance(item, str):
                prompts.append((item, tokenizer.encode(item)))
            else:
                prompts.append((None, list(item)))
        for text, ids in prompts:
            if not ids:
                raise OpenAIError("prompt must not be empty: give at least one token.", 400, param="prompt")
        return prompts

    def _make_response(self, request: CompletionRequest, request_id: str, finals: list[RequestOutput | None],
                       prompt_texts: list[str]) -> CompletionResponse:
        tokenizer = self.get_tokenizer()
        choices: list[CompletionResponseChoice] = []
        num_prompt_tokens = num_generated_tokens = num_cached_tokens = 0
        for i, output in enumerate(finals):
            if output is None:
                raise OpenAIError("A request ended without a result.", 500)
            num_prompt_tokens += len(output.prompt_token_ids)
            num_cached_tokens += output.num_cached_tokens
            for completion in output.outputs:
                num_generated_tokens += len(completion.token_ids)
                text = completion.text
                logprobs = None
                if request.echo:
                    text = prompt_texts[i] + text
                if request.logprobs is not None:
                    echoed_logprobs = output.prompt_logprobs if request.echo else None
                    logprobs = self._choice_logprobs(output, completion, prompt_texts[i], tokenizer, 0,
                                                     echoed_logprobs)
                choices.append(CompletionResponseChoice(
                    index=i * request.n + completion.index, text=text, logprobs=logprobs,
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
        usage = self.make_usage(num_prompt_tokens, num_generated_tokens, num_cached_tokens)
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    @staticmethod
    def _choice_logprobs(output: RequestOutput, completion: CompletionOutput,
                         prompt_text: str, tokenizer: Tokenizer, text_offset: int,
                         prompt_logprobs: PromptLogprobs | None = None) -> CompletionLogProbs:
        """Logprobs of one choice's new tokens, preceded by the prompt's when echoing (first chunk only)."""
        generated = completion_logprobs(completion.token_ids, completion.logprobs or [], tokenizer,
                                        text_offset + (len(prompt_text) if prompt_logprobs is not None else 0))
        if prompt_logprobs is None:
            return generated
        prompt_part = completion_logprobs(output.prompt_token_ids, prompt_logprobs, tokenizer, text_offset)
        return _merge_logprobs(prompt_part, generated)

    async def _stream(self, request: CompletionRequest, request_id: str, streams: list[AsyncIterator[RequestOutput]],
                      prompt_texts: list[str], prompt_lens: list[int]) -> AsyncIterator[str]:
        """SSE chunks: per choice its text deltas (prompt first when echoing), one finish chunk, usage, [DONE]."""
        tokenizer = self.get_tokenizer()
        created = int(time.time())
        n = request.n
        num_choices = len(streams) * n
        num_generated = [0] * num_choices
        echoed = [False] * num_choices
        text_offsets = [0] * num_choices
        prompt_logprobs: list[PromptLogprobs | None] = [None] * len(streams)
        num_cached = [0] * len(streams)
        try:
            async for i, output in merge_async_iterators(streams):
                check_failed_output(output)
                num_cached[i] = output.num_cached_tokens
                if output.prompt_logprobs is not None:
                    prompt_logprobs[i] = output.prompt_logprobs
                for completion in output.outputs:
                    index = i * n + completion.index
                    num_generated[index] += len(completion.token_ids)
                    text = completion.text
                    first = request.echo and not echoed[index]
                    if first:
                        text = prompt_texts[i] + text
                        echoed[index] = True
                    if not text and not completion.token_ids and completion.finish_reason is None:
                        continue
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self._choice_logprobs(output, completion, prompt_texts[i], tokenizer,
                                                         text_offsets[index], prompt_logprobs[i] if first else None)
                    text_offsets[index] += len(text)
                    chunk = CompletionStreamResponse(
                        id=request_id, created=created, model=self.model_name,
                        choices=[CompletionResponseChoice(index=index, text=text, logprobs=logprobs,
                                                          finish_reason=completion.finish_reason,
                                                          stop_reason=completion.stop_reason)])
                    yield sse_event(chunk.model_dump_json())
            if request.stream_options is not None and request.stream_options.include_usage:
                usage = self.make_usage(sum(prompt_lens), sum(num_generated), sum(num_cached))
                chunk = CompletionStreamResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                                 usage=usage)
                yield sse_event(chunk.model_dump_json())
        except Exception as e:
            yield stream_error_event(e)
        yield SSE_DONE
