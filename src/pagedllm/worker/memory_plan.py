"""Per-rank memory plan: how many weight and KV-cache bytes one tensor-parallel rank needs.

Built from the model's own classes on the meta device (no memory, no weights), with the
tensor-parallel state of one rank, so it counts exactly the shards the real ranks allocate.
"""

from __future__ import annotations

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


def plan_rank_memory(hf_config: dict[str, Any], dtype: torch.dtype, tensor_parallel_size: int) -> RankMemoryPlan:
    """The memory plan of rank 0 of `tensor_parallel_size` for a model config (HF config dict)."""
    from pagedllm.models.registry import resolve_model_class

    model_class = resolve_model_class(hf_config.get("architectures") or [])
    saved_state, saved_dtype = (get_tp_rank(), get_tp_size()), torch.get_default_dtype()
    set_tensor_parallel_state(0, tensor_parallel_size)
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(hf_config)
    finally:
        set_tensor_parallel_state(*saved_state)
        torch.set_default_dtype(saved_dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    layers = model.attention_layers()
    kv_heads = layers[0].num_kv_heads
    kv_bytes_per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in layers) * dtype.itemsize
    return RankMemoryPlan(tensor_parallel_size, weight_bytes, kv_bytes_per_token, kv_heads)
