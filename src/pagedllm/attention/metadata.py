"""AttentionMetadata: how one flat batch of tokens maps onto requests and KV-cache slots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Per-step description of the flat token batch, shared by every attention layer.

    Requests are ordered decodes first: the first `num_decodes` requests have exactly one query
    token each (tokens [0, num_decodes)), the rest are prefill chunks.
    """

    num_actual_tokens: int
    num_decodes: int
    # [num_reqs + 1] cumulative query lengths: request i's tokens are [qsl[i], qsl[i+1]).
    query_start_loc: torch.Tensor
    # [num_reqs] tokens in the cache after this step (context + this step's query).
    seq_lens: torch.Tensor
    # [num_tokens] flat cache slot (block_id * block_size + offset) where each new K/V goes; -1 = padding.
    slot_mapping: torch.Tensor
    # [num_reqs, max_num_blocks] block ids of each request, in order; unused entries are 0.
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that loop over prefill requests on the CPU.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Fixed split-KV partition count for decodes (set for CUDA graphs; None: chosen per step).
    num_kv_splits: int | None = None
    # What a backend derives from this step's metadata once and every layer then reuses (the
    # torch backend's decode gather plan). Filled lazily; only for metadata built for one step
    # (a CUDA graph's static metadata changes in place between replays).
    backend_cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_reqs(self) -> int:
        """Number of requests in the batch."""
        return len(self.seq_lens_cpu)
