"""Pydantic models of the OpenAI API: requests, responses, stream chunks and the error body.

Request models accept OpenAI's fields plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, ...), which the official client sends via
`extra_body`. Unknown fields are ignored, as OpenAI does. Hostile input is refused here,
before any handler runs: strings with lone UTF-16 surrogates and non-finite numbers anywhere
in a body, and sizes that would make one request cost without bound (n, best_of, stop,
logit_bias).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# Per-request caps (OpenAI's where it has one): each bounds the work or memory of one request.
MAX_N = 128
MAX_STOP_SEQUENCES = 64
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_RANGE = 100.0


def find_invalid_value(body: Any) -> str | None:
    """Where and why a raw JSON body holds a value no handler should see, or None.

    Lone surrogates ("\\ud800" escapes) make Python strings that cannot be encoded as UTF-8, so
    the tokenizer or a response echoing them would fail; NaN / Infinity are not JSON and would
    reach the sampler as such. Walked without recursion: nesting depth is the parser's limit.
    """
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{path or 'body'}: the string holds a lone UTF-16 surrogate, which is not valid Unicode"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return f"{path or 'body'}: {value} is not a finite number"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{path}.{key}" if path else str(key), key))
                stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value))
    return None


def random_id(prefix: str) -> str:
    """A unique response id such as `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    """Base of every protocol model: extra fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class OpenAIRequestModel(OpenAIBaseModel):
    """Base of request bodies: refuses lone surrogates and non-finite numbers anywhere inside."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_invalid_values(cls, data: Any) -> Any:
        problem = find_invalid_value(data)
        if problem is not None:
            raise ValueError(problem)
        return data


# ---- errors ---------------------------------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    """The `error` object of an error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error body."""

    error: ErrorInfo


# ---- shared pieces --------------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    """`stream_options`: only valid together with `stream: true`."""

    include_usage: bool | None = False


class PromptTokenUsageInfo(OpenAIBaseModel):
    """`usage.prompt_tokens_details`: prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class UsageInfo(OpenAIBaseModel):
    """Token counts of a request: prompt + completion = total (details only with prefix caching on)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


class SamplingRequestFields(OpenAIRequestModel):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    # torch generators take [-2**63, 2**64); n > 1 gives sample i the seed + i.
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1 - MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Prefix-cache entries are shared only between requests with the same salt.
    cache_salt: str | None = None
    # Beam search: best_of is the beam width (default n) and the n best beams are returned.
    best_of: int | None = Field(None, le=MAX_N)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token!r}")
        return value


# ---- /v1/completions ------------------------------------------------------------------------------


class CompletionRequest(SamplingRequestFields):
    """Body of POST /v1/completions."""

    # A string, a list of strings, token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class CompletionLogProbs(OpenAIBaseModel):
    """Legacy completions logprobs: parallel lists over the tokens of the text."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    """One choice of a completion."""

    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    """Response of a non-streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(OpenAIBaseModel):
    """One SSE chunk of a streamed completion (the usage chunk has no choices)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions -------------------------------------------------------------------------


class ChatContentPart(OpenAIBaseModel):
    """A text part of a message's content (models served here are text-only)."""

    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequestFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class ChatTopLogprob(OpenAIBaseModel):
    """One alternative token at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    """The sampled token at a position, with the most likely alternatives."""

    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    """Logprobs of a chat choice's content tokens."""

    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    """The assistant's answer in a non-streamed chat response."""

    role: str = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    """Response of a non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    """What a stream chunk adds to a choice (the first one carries the role)."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_parts(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only the parts a delta has: the role once, then content.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIBaseModel):
    """One choice's part of a chat stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    """One SSE chunk of a streamed chat completion (the usage chunk has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer, version -------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    max_model_len: int


class ModelList(OpenAIBaseModel):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIRequestModel):
    """Body of POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(OpenAIBaseModel):
    """Response of POST /tokenize."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIRequestModel):
    """Body of POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    """Response of POST /detokenize."""

    prompt: str
