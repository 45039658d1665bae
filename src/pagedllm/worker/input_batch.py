"""The runner's per-request state and the flat batch built from it each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    """What the runner remembers about a request between steps."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    # As of the start of the step being run: the scheduler sends it with every scheduled request.
    num_computed_tokens: int
    # Prompt + output tokens, the source of each step's input ids.
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    def append_output_token(self, token_id: int) -> None:
        """Record a token this runner sampled (the scheduler learns it from the runner output)."""
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)


@dataclass
class BatchInputs:
    """One step's flat batch: token ids, positions and attention metadata, plus sampling rows."""

    req_ids: list[str]  # in batch order (decodes first)
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Index into the flat tokens of each request that samples this step (its last token).
    logits_indices: torch.Tensor
    sampling_req_ids: list[str]
    # req_id -> (first flat index, number of rows, first prompt position) for prompt logprobs.
    prompt_logprob_spans: dict[str, tuple[int, int, int]]


def prepare_inputs(
    scheduler_output: SchedulerOutput,
    requests: dict[str, CachedRequestState],
    block_size: int,
    device: torch.device,
) -> BatchInputs:
    """Flatten the scheduled tokens of every request into one batch (decodes first)."""
    scheduled = scheduler_output.num_scheduled_tokens
    # Decodes first: the attention backend batches single-token queries together.
    req_ids = sorted(scheduled, key=lambda r: scheduled[r] != 1)
    num_reqs = len(req_ids)
    query_lens = np.fromiter((scheduled[r] for r in req_ids), dtype=np.int64, count=num_reqs)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    num_decodes = int(np.searchsorted(query_lens != 1, True)) if num_reqs else 0

    input_ids = np.empty(num_tokens, dtype=np.int64)
    positions = np.empty(num_tokens, dtype=np.int64)
    seq_lens = np.empty(num_reqs, dtype=np.int64)
    max_blocks = max(len(requests[r].block_ids) for r in req_ids)
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int64)
    logits_indices: list[int] = []
    sampling_req_ids: list[str] = []
    prompt_logprob_spans: dict[str, tuple[int, int, int]] = {}

    for i, req_id in enumerate(req_ids):
        state = requests[req_id]
        start, n = int(query_start_loc[i]), int(query_lens[i])
        computed = state.num_computed_tokens
        end = computed + n
        if n == 1:
            input_ids[start] = state.token_ids[computed]
            positions[start] = computed
        else:
            input_ids[start : start + n] = state.token_ids[computed:end]
            positions[start : start + n] = np.arange(computed, end)
        seq_lens[i] = end
        block_tables[i, : len(state.block_ids)] = state.block_ids
        if end == len(state.token_ids):
            logits_indices.append(start + n - 1)
            sampling_req_ids.append(req_id)
        if state.sampling_params.prompt_logprobs is not None and computed < state.num_prompt_tokens - 1:
            # Position p predicts prompt token p + 1; the last prompt position predicts the output.
            rows = min(end, state.num_prompt_tokens - 1) - computed
            prompt_logprob_spans[req_id] = (start, rows, computed)

    block_ids_per_token = block_tables[np.repeat(np.arange(num_reqs), query_lens), positions // block_size]
    slot_mapping = block_ids_per_token * block_size + positions % block_size

    def to_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_decodes=num_decodes,
        query_start_loc=to_device(query_start_loc.astype(np.int32)),
        seq_lens=to_device(seq_lens),
        slot_mapping=to_device(slot_mapping),
        block_tables=to_device(block_tables),
        max_query_len=int(query_lens.max()) if num_reqs else 0,
        max_seq_len=int(seq_lens.max()) if num_reqs else 0,
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
    )
    return BatchInputs(
        req_ids=req_ids,
        input_ids=to_device(input_ids),
        positions=to_device(positions),
        attn_metadata=metadata,
        logits_indices=to_device(np.asarray(logits_indices, dtype=np.int64)),
        sampling_req_ids=sampling_req_ids,
        prompt_logprob_spans=prompt_logprob_spans,
    )
