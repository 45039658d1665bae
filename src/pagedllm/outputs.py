"""Results handed back to users: RequestOutput, CompletionOutput, Logprob (vLLM shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Per position: token id -> Logprob, with the sampled (or prompt) token always included.
SampleLogprobs = list[dict[int, "Logprob"]]
PromptLogprobs = list[dict[int, "Logprob"] | None]


@dataclass
class Logprob:
    """Log-probability of one token at one position, its rank, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    error: str | None = None  # with finish_reason "error": what failed for this request alone

    def finished(self) -> bool:
        """True once this sequence has a finish_reason."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything produced for one request so far (or in total once `finished`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: "RequestMetrics | None" = None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list, repr=False)


@dataclass
class BeamSearchSequence:
    """One finished beam: its tokens (prompt included, as in vLLM), text and scores."""

    tokens: list[int]
    # Top-k log-probabilities at each generated position, the chosen token included.
    logprobs: SampleLogprobs
    cum_logprob: float
    # cum_logprob divided by (generated length ** length_penalty): what beams are ranked by.
    score: float
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) or "length"
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens only."""
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """The beam search result of one prompt: its best sequences, best first."""

    sequences: list[BeamSearchSequence]
