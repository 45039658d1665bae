"""Sampling parameters of one request, with vLLM's field names and validation."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# vLLM's logits processor: (output_token_ids, logits_row) -> logits_row, or with the prompt's
# token ids first: (prompt_token_ids, output_token_ids, logits_row) -> logits_row.
LogitsProcessor = Callable[..., Any]
# torch.Generator.manual_seed accepts [-2**63, 2**64); a seed outside would crash the engine core.
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a streaming request carries."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt (vLLM-compatible fields).

    Every invalid value raises ValueError naming the field.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    # Applied in order to the request's logits row before sampling (offline LLM API only: the
    # callables run inside the engine). An exception in one fails only this request.
    logits_processors: list[LogitsProcessor] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine, not by users: token ids that end the request unless ignore_eos.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"logit_bias must map token ids to floats, got {self.logit_bias!r}") from e
        self._verify()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"{name} {message}, got {getattr(self, name)!r}.")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                fail(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            fail("repetition_penalty", "must be greater than zero")
        if not self.temperature >= 0.0:
            fail("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be -1 (disable), 0 (disable) or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            fail("seed", "must be an integer in [-2**63, 2**64)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "must be at least 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "must be greater than or equal to 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be less than or equal to max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                fail(name, "must be a non-negative integer")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            fail("stop", "must contain only non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must contain only non-negative integers")
        if self.stop and not self.detokenize:
            fail("stop", "strings need detokenize=True")
        if self.logit_bias and not all(math.isfinite(v) for v in self.logit_bias.values()):
            fail("logit_bias", "values must be finite numbers")
        if self.logits_processors is not None and not all(callable(p) for p in self.logits_processors):
            fail("logits_processors", "must be a list of callables")

    @property
    def sampling_type_greedy(self) -> bool:
        """True when the request is sampled by argmax (temperature 0)."""
        return self.temperature < 1e-5

    @property
    def all_stop_token_ids(self) -> set[int]:
        """stop_token_ids plus the model's end-of-sequence ids (set by the engine)."""
        return self._all_stop_token_ids

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        """Add the model's end-of-sequence tokens to the stop set (unless ignore_eos)."""
        if not self.ignore_eos:
            self._all_stop_token_ids = set(self.stop_token_ids) | set(eos_token_ids)

    def clone(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields replaced (used to fan out n > 1 into children)."""
        values = {f: getattr(self, f) for f in self.__dataclass_fields__ if not f.startswith("_")}
        values.update(changes)
        out = SamplingParams(**values)
        out._all_stop_token_ids = set(self._all_stop_token_ids)
        return out


@dataclass
class BeamSearchParams:
    """Parameters of `LLM.beam_search` (vLLM's fields, plus Hugging Face's `early_stopping`).

    The search is Hugging Face's (`generate(num_beams=beam_width, do_sample=False, ...)`):
    `length_penalty` divides a finished sequence's log-probability by its generated length to
    that power; `early_stopping` is True (stop once beam_width sequences have finished), False
    (also stop when no running beam is likely to beat them) or "never" (only when none can).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
