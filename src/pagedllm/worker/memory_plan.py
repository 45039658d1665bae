"""Per-rank memory plan: how many weight and KV-cache bytes one tensor-parallel rank needs.

Built from the model's own classes on the meta device (no memory, no weights), with the
tensor-parallel state of one rank, so it counts exactly the shards the real ranks allocate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.distributed import get_tp_rank, get_tp_size, set_tensor_parallel_state


@dataclass
class RankMemoryPlan:
    """What one rank holds: its weight shard and the KV bytes per cached token."""

    tensor_parallel_size: int
    weight_bytes: int
    kv_bytes_per_token: int
    num_kv_heads_per_rank: int

    def kv_cache_tokens(self, device_bytes: int, gpu_memory_utilization: float = 0.9,
                        activation_bytes: int = 0) -> int:
        """Tokens the rank's KV pool holds on a device of `device_bytes` after weights and activations."""
        budget = int(device_bytes * gpu_memory_utilization) - self.weight_bytes - activation_bytes
        return max(budget, 0) // self.kv_bytes_per_token


def kv_cache_bytes_per_token(attention_layers: Sequence[Any], dtype: torch.dtype) -> int:
    """Bytes one cached token takes on this rank: keys and values of every layer's KV heads."""
    return sum(2 * layer.num_kv_heads * layer.head_dim for layer in attention_layers) * dtype.itemsize


def plan_rank_memory(hf_config: dict[str, Any], dtype: torch.dtype, tensor_parallel_size: int) -> RankMemoryPlan:
    """The memory plan of rank 0 of `tensor_parallel_size` for a model config (HF config dict)."""
    from pagedllm.loader.model_loader import build_model

    saved_state = (get_tp_rank(), get_tp_size())
    set_tensor_parallel_state(0, tensor_parallel_size)
    try:
        model = build_model(hf_config, dtype, "meta")
    finally:
        set_tensor_parallel_state(*saved_state)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    layers = model.attention_layers()
    return RankMemoryPlan(tensor_parallel_size, weight_bytes, kv_cache_bytes_per_token(layers, dtype),
                          layers[0].num_kv_heads)
