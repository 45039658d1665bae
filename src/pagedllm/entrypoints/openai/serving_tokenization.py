"""POST /tokenize and /detokenize: the model's tokenizer (and chat template) over HTTP."""

from __future__ import annotations

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_chat import render_messages
from pagedllm.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    """Handles /tokenize and /detokenize."""

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], chat_template: str | None) -> None:
        super().__init__(engine, served_model_names, max_logprobs=0)
        self.chat_template = chat_template

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of chat messages rendered with the chat template."""
        self.check_model(request.model)
        tokenizer = self.get_tokenizer()
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("Give exactly one of prompt or messages.", 400, param="prompt")
        if request.messages is not None:
            text = render_messages(tokenizer, request.messages, self.chat_template, request.add_generation_prompt,
                                   None)
            tokens = tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = tokenizer.encode(request.prompt or "", add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=self.max_model_len)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of a list of token ids."""
        self.check_model(request.model)
        tokenizer = self.get_tokenizer()
        vocab_size = self.engine.config.model_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise OpenAIError(f"Token id {bad[0]} is outside the vocabulary [0, {vocab_size}).", 400, param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))
