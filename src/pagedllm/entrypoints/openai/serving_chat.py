"""POST /v1/chat/completions: a conversation, rendered with the model's chat template, -> the assistant's answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import jinja2
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
    random_id,
)
from pagedllm.entrypoints.openai.serving_engine import (
    MIN_LOGPROB,
    SSE_DONE,
    OpenAIError,
    OpenAIServing,
    RequestLimits,
    as_openai_error,
    check_failed_output,
    sse_event,
    stream_error_event,
)
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.tokenizer import Tokenizer

def chat_logprobs(completion: CompletionOutput, num_top: int, tokenizer: Tokenizer) -> ChatChoiceLogprobs:
    """Chat-format logprobs of a choice's tokens: the sampled token and its `num_top` best alternatives."""
    content: list[ChatTokenLogprob] = []
    for token_id, entry in zip(completion.token_ids, completion.logprobs or []):
        sampled = entry.get(token_id)
        token = tokenizer.id_to_text(token_id)
        ranked = sorted((lp.rank, tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= num_top)
        top = []
        for _, tid, lp in ranked[:num_top]:
            text = lp.decoded_token if lp.decoded_token is not None else tokenizer.id_to_text(tid)
            top.append(ChatTopLogprob(token=text, logprob=max(lp.logprob, MIN_LOGPROB), bytes=list(text.encode())))
        logprob = max(sampled.logprob, MIN_LOGPROB) if sampled is not None else MIN_LOGPROB
        content.append(ChatTokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


def render_messages(tokenizer: Tokenizer, messages: list[ChatMessage], chat_template: str | None,
                    add_generation_prompt: bool, template_kwargs: dict | None) -> str:
    """The conversation as prompt text, via the chat template; 400 if it cannot be rendered."""
    conversation = [m.model_dump(exclude_none=True) for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, **(template_kwargs or {}))
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise OpenAIError(f"The messages could not be rendered with the chat template: {e}", 400,
                          param="messages") from e
    assert isinstance(text, str)
    return text


class OpenAIServingChat(OpenAIServing):
    """Handles /v1/chat/completions."""

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], max_logprobs: int,
                 chat_template: str | None, limits: RequestLimits | None = None,
                 trust_request_chat_template: bool = False) -> None:
        super().__init__(engine, served_model_names, max_logprobs, limits)
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template

    async def create_chat_completion(self, request: ChatCompletionRequest) -> Response:
        """Validate, render and queue the conversation; return the JSON response or the SSE stream."""
        deadline = self.deadline_of(asyncio.get_running_loop().time())
        self.check_model(request.model)
        if request.chat_template is not None and not self.trust_request_chat_template:
            # A template is code: a hostile one can loop for hours inside the sandbox.
            raise OpenAIError("chat_template in a request is refused: the server runs the model's template only "
                              "(start it with --trust-request-chat-template to allow it).", 400,
                              param="chat_template")
        self.check_stream_options(request)
        self.check_best_of(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true.", 400, param="top_logprobs")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self.check_logprobs(num_logprobs, "top_logprobs")
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIError(f"{param} must be at least 1, got {max_tokens}.", 400, param=param)
        tokenizer = self.get_tokenizer()
        text = render_messages(tokenizer, request.messages, request.chat_template or self.chat_template,
                               request.add_generation_prompt, request.chat_template_kwargs)
        # The template writes its own special tokens (BOS included), so none are added on top.
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        self.check_length(len(prompt_ids), max_tokens, "messages", param)
        request_id = random_id("chatcmpl")
        prompt = self.make_prompt(text, prompt_ids, request)
        fields = set(ChatCompletionRequest.model_fields)
        if request.use_beam_search:
            beam_params = self.make_beam_search_params(request, max_tokens, "logprobs" if request.logprobs else None)
            [stream] = self.start_beam_searches(request_id, [prompt], beam_params, request.n, "messages", fields,
                                                deadline)
        else:
            params = self.make_sampling_params(request, max_tokens, num_logprobs, None)
            [stream] = self.add_requests(request_id, [prompt], params, "messages", fields, deadline)
        sub_ids = [f"{request_id}-0"]
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, stream, len(prompt_ids)),
                                     media_type="text/event-stream", background=BackgroundTask(self.abort_all, sub_ids))
        final: RequestOutput | None = None
        try:
            async for output in stream:
                check_failed_output(output)
                final = output
        except ValueError as e:  # refused by the engine core after queueing
            raise as_openai_error(e) from e
        finally:
            self.abort_all(sub_ids)
        if final is None:
            raise OpenAIError("The request ended without a result.", 500)
        return JSONResponse(self._make_response(request, request_id, final, num_logprobs).model_dump())

    def _make_response(self, request: ChatCompletionRequest, request_id: str, output: RequestOutput,
                       num_logprobs: int | None) -> ChatCompletionResponse:
        tokenizer = self.get_tokenizer()
        choices = []
        for completion in output.outputs:
            logprobs = chat_logprobs(completion, num_logprobs, tokenizer) if num_logprobs is not None else None
            choices.append(ChatCompletionResponseChoice(
                index=completion.index, message=ChatResponseMessage(content=completion.text), logprobs=logprobs,
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        usage = self.make_usage(len(output.prompt_token_ids), num_generated, output.num_cached_tokens)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(self, request: ChatCompletionRequest, request_id: str, stream: AsyncIterator[RequestOutput],
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        """SSE chunks: the role first, content deltas, one finish chunk per choice, usage, [DONE]."""
        tokenizer = self.get_tokenizer()
        created = int(time.time())
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            body = ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name, choices=[choice])
            return sse_event(body.model_dump_json())

        num_generated = num_cached = 0
        for index in range(request.n):
            yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        try:
            async for output in stream:
                check_failed_output(output)
                num_cached = output.num_cached_tokens
                for completion in output.outputs:
                    num_generated += len(completion.token_ids)
                    if not completion.text and not completion.token_ids and completion.finish_reason is None:
                        continue
                    logprobs = None
                    if num_logprobs is not None:
                        logprobs = chat_logprobs(completion, num_logprobs, tokenizer)
                    yield chunk(ChatCompletionStreamChoice(
                        index=completion.index, delta=DeltaMessage(content=completion.text), logprobs=logprobs,
                        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
            if request.stream_options is not None and request.stream_options.include_usage:
                usage = self.make_usage(num_prompt_tokens, num_generated, num_cached)
                body = ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                    choices=[], usage=usage)
                yield sse_event(body.model_dump_json())
        except Exception as e:
            yield stream_error_event(e)
        yield SSE_DONE
