"""Rotary position embedding (RoPE) with a precomputed cos/sin table, incl. llama3 scaling."""

from __future__ import annotations

import math
from typing import Any

import torch

from pagedllm.layers.custom_op import CustomOp


def rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of an HF config, in either the old (rope_scaling) or new (rope_parameters) form."""
    params = dict(hf_config.get("rope_scaling") or {})
    params.update(hf_config.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _inverse_frequencies(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    inv_freq = _scaled_inverse_frequencies(rotary_dim, params)
    # llama.cpp files store llama3-style scaling as explicit per-frequency divisors (rope_freqs).
    factors = params.get("inv_freq_factors")
    if factors is not None:
        if len(factors) != inv_freq.numel():
            raise ValueError(f"inv_freq_factors has {len(factors)} entries, expected {inv_freq.numel()}.")
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    return inv_freq


def _scaled_inverse_frequencies(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"rope type {rope_type!r} is not supported; supported: default, linear, llama3."
    )


class RotaryEmbedding(CustomOp):
    """Applies RoPE (rotate-half / NeoX layout, as in Hugging Face Llama) at given positions.

    On CUDA the query and key are rotated in place by one Triton kernel
    (`triton_fused.rotary_embedding_`); the returned tensors are then the inputs themselves.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        inv_freq = _inverse_frequencies(rotary_dim, params)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Buffers are not parameters: the loader never sees them; they follow .to(device).
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward_native(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query [T, H, D] and key [T, Hkv, D] by their token positions [T]."""
        cos = self.cos_cache.index_select(0, positions).unsqueeze(1)
        sin = self.sin_cache.index_select(0, positions).unsqueeze(1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def forward_cuda(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as forward_native, but rotating query and key in place in one kernel."""
        if query.dim() != 3 or key.dim() != 3 or query.stride(-1) != 1 or key.stride(-1) != 1:
            return self.forward_native(positions, query, key)
        from pagedllm.layers import triton_fused

        triton_fused.rotary_embedding_(positions, query, key, self.cos_cache, self.sin_cache, self.rotary_dim)
        return query, key

    def rotate_from(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, first_token: int) -> None:
        """Rotate tokens [first_token, T) in place with the fused kernel (the CUDA path of a mixed
        batch whose decodes the attention kernel rotates)."""
        from pagedllm.layers import triton_fused

        triton_fused.rotary_embedding_(positions, query, key, self.cos_cache, self.sin_cache, self.rotary_dim,
                                       first_token=first_token)

    def foldable_into_attention(self, positions: torch.Tensor) -> bool:
        """Whether the decode attention kernel may apply this rotary itself: fused kernels on,
        CUDA, and the whole head rotated (the kernel has no partial-rotary pass-through)."""
        return (self.use_fused_path(positions) and self.rotary_dim == self.head_dim
                and self.cos_cache.dtype == torch.float32)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        rot = rot.to(cos.dtype)
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = (rot * cos + rotated * sin).to(dtype)
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
