"""Turns user prompts into validated token ids before anything reaches the engine core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

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
        bad = _first_out_of_range(token_ids, self.vocab_size)
        if bad is not None:
            raise ValueError(f"Token id {bad} in the prompt is outside the vocabulary [0, {self.vocab_size}).")
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
                ids = _int_list(prompt["prompt_token_ids"])
                if ids is None:
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), ids
            if "prompt" in prompt:
                if not isinstance(prompt["prompt"], str):
                    raise ValueError("prompt must be a string.")
                return prompt["prompt"], self._encode(prompt["prompt"])
            raise ValueError("A prompt dict needs a 'prompt' (text) or 'prompt_token_ids' (list of ints) key.")
        ids = _int_list(prompt)
        if ids is not None:
            return None, ids
        raise ValueError(f"Unsupported prompt type {type(prompt).__name__}: give a string, a dict or a token-id list.")

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("This model was loaded without a tokenizer: give prompts as token ids.")
        return self.tokenizer.encode(text)


def _int_list(values: object) -> list[int] | None:
    """`values` as a new list of Python ints when it is a list of integers, else None.

    Prompts run to thousands of ids, and a per-element isinstance check in Python cost ~0.1 ms
    per request: numpy types the whole list at once (integer scalars of any kind come back as
    Python ints), and only lists it cannot type as integers (ints beyond int64, mixed types)
    take the per-element check.
    """
    if not isinstance(values, list):
        return None
    if not values:
        return []
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nested lists
        return None
    if array.ndim == 1 and array.dtype.kind in "iu":
        return array.tolist()
    if all(isinstance(t, int) for t in values):
        return list(values)
    return None


def _first_out_of_range(token_ids: list[int], vocab_size: int) -> int | None:
    """The first id outside [0, vocab_size), or None."""
    try:
        ids = np.asarray(token_ids, dtype=np.int64)
    except OverflowError:  # an id beyond int64 is out of range for sure
        return next(t for t in token_ids if not 0 <= t < vocab_size)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    return int(ids[bad[0]]) if bad.size else None
