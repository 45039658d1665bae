"""What the model runner returns for one step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogprobsLists:
    """Top-k log-probabilities for a set of positions.

    Row i holds, for one position: token ids [sampled/actual token, top-1, ..., top-k],
    their log-probabilities, and the rank of the first token among the vocabulary (1 = best).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    """Per request of the step: the sampled tokens (empty while a prefill is still partial)."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # req_id -> logprobs of the tokens sampled this step (when the request asked for logprobs).
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # req_id -> prompt logprobs of the prompt positions computed this step (first position has none).
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # req_id -> why the request failed this step (its logits processor raised); its sampled
    # token is meaningless and the scheduler finishes it with FINISHED_ERROR.
    request_errors: dict[str, str] = field(default_factory=dict)
