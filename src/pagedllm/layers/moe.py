"""Sparse mixture-of-experts: a router picks top-k SwiGLU experts per token.

Expert weights are stacked ([E, 2I, H] for gate|up, [E, H, I] for down) so that each expert
that received tokens runs as one gathered matmul; the loop is over experts, never tokens.
With tensor parallelism every rank holds a slice of each expert's intermediate dimension and
the partial outputs are all-reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], expert ids [T, k]) from logits [T, E]: softmax in fp32, top-k, optional renorm."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for x [T, H], w13 [E, 2I, H], w2 [E, H, I].

    Each expert that received tokens gathers them and runs one matmul pair. The per-expert token
    counts need a host sync, which CUDA-graph capture forbids; while capturing (decode batches,
    few tokens) the sync-free `dense_experts` is used instead.
    """
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return dense_experts(x, w13, w2, weights, ids)
    top_k = ids.shape[-1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    flat_weights = weights.reshape(-1, 1)
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // top_k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        hidden = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, hidden * flat_weights[pairs])
    return out


# Largest step a CUDA graph runs through `dense_experts`. Dense does T * E expert-token products
# against the routed T * top_k, but it reads each expert's weights once either way: at T tokens
# that is ~T FLOPs per weight byte, under the ~200 FLOP/byte where an H100/H200 stops being
# bound by memory, so up to here dense costs about what reading the experts costs (which the
# routed path pays too once T * top_k >= E). Longer prefill steps stay eager and routed.
MAX_DENSE_GRAPH_TOKENS = 128


def dense_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Same result as `fused_experts` without host syncs: every expert runs on every token,
    its output scaled by the token's routing weight (zero when not routed there)."""
    dense = torch.zeros(x.shape[0], w13.shape[0], dtype=weights.dtype, device=x.device)
    dense.scatter_(1, ids, weights)
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)
        out += F.linear(F.silu(gate) * up, w2[expert]) * dense[:, expert : expert + 1]
    return out


class FusedMoE(nn.Module):
    """Router + stacked SwiGLU experts; `forward` maps [T, H] -> [T, H]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool = True) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        if intermediate_size % self.tp_size:
            raise ValueError(f"Expert intermediate size ({intermediate_size}) is not divisible by the "
                             f"tensor-parallel size ({self.tp_size}).")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.inter = intermediate_size // self.tp_size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter), requires_grad=False)

    def load_expert(self, shard: str, expert: int, loaded: torch.Tensor) -> None:
        """Copy this rank's slice of one expert's checkpoint tensor: shard "gate", "up" or "down"."""
        start = self.tp_rank * self.inter
        if shard == "down":
            self.w2_weight.data[expert].copy_(loaded.narrow(1, start, self.inter))
        else:
            offset = 0 if shard == "gate" else self.inter
            self.w13_weight.data[expert].narrow(0, offset, self.inter).copy_(loaded.narrow(0, start, self.inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route every token to its top-k experts and sum their weighted outputs."""
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = fused_experts(x, self.w13_weight, self.w2_weight, weights, ids)
        return tensor_model_parallel_all_reduce(out)
