"""The Attention layer models use: writes new K/V into the paged cache and attends over it."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention import torch_backend
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.rotary import RotaryEmbedding


def _triton_backend():
    # Imported on first CUDA use only: the CPU path needs no Triton.
    from pagedllm.attention import triton_backend

    return triton_backend


class Attention(nn.Module):
    """Paged attention for one transformer layer; the runner binds its KV cache tensor.

    `sliding_window`: this layer's query at position p sees only keys p - W + 1 .. p (None: all
    earlier keys). `logits_soft_cap`: scores are capped to `cap * tanh(score / cap)` (Gemma 2).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner.
        self.kv_cache = torch.empty(0)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata,
        rotary: RotaryEmbedding | None = None, positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [T, H*D], key/value [T, Hkv*D] -> attention output [T, H*D].

        With `rotary`, query and key are rotated at `positions` first. On CUDA, when the rotary
        can be folded (`RotaryEmbedding.foldable_into_attention`), the decodes' rotation and K/V
        write happen inside the decode attention kernel (two launches fewer per layer, same
        arithmetic; the prefill tokens of a mixed batch take the separate kernels), so every
        decode, CUDA graph or not, runs the same compiled kernel.
        """
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_dim)
        k = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if rotary is not None and positions is None:
            raise ValueError("Attention with a rotary embedding needs the token positions")
        num_decodes = metadata.num_decodes
        fold = (q.is_cuda and rotary is not None and num_decodes > 0
                and rotary.foldable_into_attention(positions))
        if rotary is not None and not fold:
            q, k = rotary(positions, q, k)
        if not q.is_cuda:
            torch_backend.write_to_kv_cache(k, v, self.kv_cache, metadata.slot_mapping)
            out = torch_backend.paged_attention(q, self.kv_cache, metadata, self.scale,
                                                sliding_window=self.sliding_window,
                                                logits_soft_cap=self.logits_soft_cap)
            return out.view(num_tokens, self.num_heads * self.head_dim)
        backend = _triton_backend()
        new_tokens, first_written = None, 0
        if fold:  # the decodes are rotated and written by the decode kernel; the prefill tokens here
            first_written = num_decodes
            if num_tokens > num_decodes:
                rotary.rotate_from(positions, q, k, first_token=num_decodes)
            new_tokens = backend.NewTokens(k, v, metadata.slot_mapping, positions, rotary.cos_cache,
                                           rotary.sin_cache)
        backend.reshape_and_cache(k, v, self.kv_cache, metadata.slot_mapping, first_token=first_written)
        out = backend.paged_attention(q, self.kv_cache, metadata, self.scale,
                                      num_kv_splits=metadata.num_kv_splits,
                                      sliding_window=self.sliding_window,
                                      logits_soft_cap=self.logits_soft_cap, new_tokens=new_tokens)
        return out.view(num_tokens, self.num_heads * self.head_dim)
