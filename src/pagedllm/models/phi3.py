"""Phi-3: a Llama-structured decoder whose checkpoints store fused `qkv_proj` and `gate_up_proj`.

The modules are Llama's (partial rotary comes from `partial_rotary_factor`); loading splits the
fused checkpoint tensors into their q/k/v and gate/up parts so the fused layers shard them
per tensor-parallel rank exactly as for Llama.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pagedllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 (mini/medium) causal LM; a `sliding_window` in the config applies to every layer."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face Phi-3 tensors, splitting the fused ones; returns the parameter names loaded."""
        return super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield checkpoint tensors with qkv_proj / gate_up_proj split into Llama's separate names."""
        config = self.config
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        qkv_sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        for name, tensor in weights:
            if ".qkv_proj." in name:
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split(qkv_sizes, dim=0)):
                    yield name.replace(".qkv_proj.", f".{part}."), piece
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2, dim=0)
                yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                yield name.replace(".gate_up_proj.", ".up_proj."), up
            else:
                yield name, tensor
