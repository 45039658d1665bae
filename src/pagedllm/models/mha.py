"""Multi-head self-attention without rotary embeddings, shared by the learned-position families (GPT-2, OPT)."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.linear import QKVParallelLinear, RowParallelLinear


class MultiHeadSelfAttention(nn.Module):
    """Fused QKV projection, paged attention, output projection (`qkv_proj`, `out_proj`)."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool, scale: float | None = None) -> None:
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_heads, bias=bias)
        self.num_heads = self.qkv_proj.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias=bias)
        scale = self.head_dim**-0.5 if scale is None else scale
        self.attn = Attention(self.num_heads, self.head_dim, self.num_heads, scale)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        q, k, v = self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v, metadata))
