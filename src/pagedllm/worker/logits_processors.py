"""Per-request logits processors (vLLM's offline `SamplingParams.logits_processors`), isolated per row.

A processor is user code running inside the engine. One that raises, or returns something
that is not a logits row of the right shape, fails only its own request: the runner reports
it in `ModelRunnerOutput.request_errors` and the scheduler finishes that request with
finish_reason "error", while every other row of the batch is sampled as usual. A row a
processor fills with NaN / inf is sanitised by the sampler like any other.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from pagedllm.worker.input_batch import CachedRequestState

logger = logging.getLogger(__name__)


def _num_params(processor: Any) -> int:
    """How many arguments the processor takes: 2 (output ids, logits) or 3 (prompt ids first)."""
    try:
        return len(inspect.signature(processor).parameters)
    except (TypeError, ValueError):
        return 2  # builtins and C callables without a signature: vLLM's default form


def apply_logits_processors(logits: torch.Tensor, states: Sequence[CachedRequestState]) -> dict[str, str]:
    """Run each row's processors on `logits[row]` (row i = states[i]), in place.

    Returns {request id: what failed} for the rows whose processors failed; those rows are
    left as they were.
    """
    errors: dict[str, str] = {}
    for row, state in enumerate(states):
        processors = state.sampling_params.logits_processors
        if not processors:
            continue
        try:
            values = logits[row]
            # Copies: user code must not be able to change the engine's view of the request.
            output_ids = tuple(state.output_token_ids)
            for processor in processors:
                if _num_params(processor) >= 3:
                    values = processor(tuple(state.prompt_token_ids), output_ids, values)
                else:
                    values = processor(output_ids, values)
                if not isinstance(values, torch.Tensor) or values.shape != logits[row].shape:
                    got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                    raise TypeError(f"a logits processor must return a tensor of shape {tuple(logits[row].shape)}, "
                                    f"got {got}")
            logits[row] = values
        except Exception as e:  # user code: anything may come out of it
            errors[state.req_id] = f"The request's logits processor failed: {type(e).__name__}: {e}"
            # The request id only: the prompt never goes to the log.
            logger.warning("Request %s failed in its logits processor (%s); the rest of the batch goes on.",
                           state.req_id, type(e).__name__)
    return errors
