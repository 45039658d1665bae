"""From one validated user request to the engine-core Requests that run it (n > 1 fans out).

Shared by the synchronous LLMEngine and the server's AsyncLLM, so both fronts fill in the same
defaults (stop tokens, max_tokens) and fan out parallel samples the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedllm.engine.input_processor import ProcessedPrompt
from pagedllm.engine.output_processor import OutputProcessor, ParentRequest
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig
    from pagedllm.tokenizer import Tokenizer


def model_eos_token_ids(model_config: ModelConfig, tokenizer: Tokenizer | None) -> set[int]:
    """Token ids that end generation unless ignore_eos: the config's EOS plus the tokenizer's end-of-turn ids."""
    eos_token_ids = set(model_config.eos_token_ids)
    if tokenizer is not None:
        eos_token_ids |= tokenizer.eos_token_ids
    return eos_token_ids


def make_engine_core_requests(
    request_id: str,
    processed: ProcessedPrompt,
    params: SamplingParams,
    arrival_time: float,
    eos_token_ids: set[int],
    max_model_len: int,
    output_processor: OutputProcessor,
) -> list[Request]:
    """Register a request with the output processor and return the Requests for the engine core.

    With n == 1 that is one Request under `request_id`; with n > 1 a ParentRequest gathers n
    children (ids `"{i}_{request_id}"`), each a one-sample Request. Children after the first
    name it as their fork source: with prefix caching they share its prompt blocks rather than
    prefilling the prompt again.
    """
    params = params.clone()
    params.update_from_generation_config(eos_token_ids)
    if params.max_tokens is None:
        params.max_tokens = max_model_len - len(processed.prompt_token_ids)
    if params.n == 1:
        children = [(request_id, params, 0)]
        parent = None
    else:
        parent = ParentRequest(request_id, params)
        children = parent.child_requests()
    requests: list[Request] = []
    for child_id, child_params, index in children:
        output_processor.add_request(child_id, processed.prompt, processed.prompt_token_ids, child_params,
                                     arrival_time, parent=parent, index=index)
        fork_source_id = children[0][0] if index > 0 else None
        requests.append(Request(child_id, processed.prompt_token_ids, child_params, arrival_time,
                                cache_salt=processed.cache_salt, fork_source_id=fork_source_id))
    return requests
