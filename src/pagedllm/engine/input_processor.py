"""Turns user prompts into validated token ids before anything reaches the engine core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer

# vLLM's prompt shapes: a string, {"prompt": str}, or {"prompt_token_ids": [...]}; a dict may
# also carry "cache_salt" (a string keeping its prefix-cache entries apart from other salts').
PromptType = Union[str, dict[str, Any], list[int]]


@dataclass
class ProcessedPrompt:
    """A prompt as text (when known) and token ids, with its prefix-cache salt (if any)."""

    prompt: str | None
    prompt_token_ids: list[int]
    # Requests share prefix-cache blocks only with requests of the same salt (None: the common pool).
    cache_salt: str | None = None


class InputProcessor:
    """Tokenizes and validates prompts and sampling parameters against the model's limits."""

    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def process(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        """Tokenize `prompt` and check it and `params`; raises ValueError naming the problem."""
        text, token_ids = self._tokenize(prompt)
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}.")
        if not token_ids:
            raise ValueError("The prompt is empty: give at least one token.")
        if len(token_ids) > self.max_model_len - 1:
            raise ValueError(
                f"The prompt has {len(token_ids)} tokens, more than fit the maximum model length "
                f"max_model_len={self.max_model_len} with at least one generated token."
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} in the prompt is outside the vocabulary [0, {self.vocab_size}).")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).")
        bad = [t for t in params.stop_token_ids or [] if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids entry {bad[0]} is outside the vocabulary [0, {self.vocab_size}).")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model was loaded without one.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name}={value} exceeds the vocabulary size {self.vocab_size}.")
        return ProcessedPrompt(text, token_ids, cache_salt)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                if not isinstance(prompt["prompt"], str):
                    raise ValueError("prompt must be a string.")
                return prompt["prompt"], self._encode(prompt["prompt"])
            raise ValueError("A prompt dict needs a 'prompt' (text) or 'prompt_token_ids' (list of ints) key.")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"Unsupported prompt type {type(prompt).__name__}: give a string, a dict or a token-id list.")

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("This model was loaded without a tokenizer: give prompts as token ids.")
        return self.tokenizer.encode(text)
