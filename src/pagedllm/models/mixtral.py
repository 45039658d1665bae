"""Sparse mixture-of-experts models: Mixtral and Qwen3-MoE.

Both are Llama-family decoders whose feed-forward block is a `FusedMoE`; attention, norms,
RoPE and the dense-weight loading are reused from llama.py. Checkpoint expert tensors, either
per expert (`experts.{e}.w1` / `gate_proj` ...) or stacked (`experts.gate_up_proj`), are
loaded into the stacked expert weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagedllm.layers.moe import FusedMoE
from pagedllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedllm.models.pipeline import is_missing_parameter

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
_SHARD = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama block whose MLP is a top-k (renormalised) mixture of SwiGLU experts."""

    def make_mlp(self, config: dict[str, Any], layer_idx: int) -> nn.Module:
        """The sparse MoE block (Mixtral always renormalises the top-k weights)."""
        return FusedMoE(config["num_local_experts"], config["num_experts_per_tok"], config["hidden_size"],
                        config["intermediate_size"], renormalize=True)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    """Qwen3 block (q/k norm) whose MLP is sparse except on `mlp_only_layers` / off the sparse step."""

    def make_mlp(self, config: dict[str, Any], layer_idx: int) -> nn.Module:
        """FusedMoE on sparse layers, a dense SwiGLU MLP otherwise (as Hugging Face decides)."""
        num_experts = config.get("num_experts") or config.get("num_local_experts") or 0  # renamed in HF v5
        sparse = (layer_idx not in (config.get("mlp_only_layers") or []) and num_experts > 0
                  and (layer_idx + 1) % config.get("decoder_sparse_step", 1) == 0)
        if not sparse:
            return LlamaMLP(config)
        return FusedMoE(num_experts, config["num_experts_per_tok"], config["hidden_size"],
                        config["moe_intermediate_size"], renormalize=bool(config.get("norm_topk_prob", False)))


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral: Mistral attention + sparse MoE (`block_sparse_moe` in checkpoints)."""

    decoder_layer_cls = MixtralDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load expert tensors into the stacked weights; the rest goes through the Llama loader."""
        expert_loaded: set[str] = set()
        loaded = super().load_weights(self._load_experts(weights, expert_loaded))
        return loaded | expert_loaded

    def _load_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]], loaded: set[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Consume expert tensors (recording targets in `loaded`), yield every other tensor renamed."""
        modules = dict(self.named_modules())
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            if is_missing_parameter(name, self):
                continue  # another pipeline stage's
            if match := _PER_EXPERT.match(name):
                prefix, expert, kind = match.group(1), int(match.group(2)), match.group(3)
                moe = modules[prefix.removesuffix(".experts")]
                moe.load_expert(_SHARD[kind], expert, tensor)
                loaded.add(f"{prefix.removesuffix('.experts')}.{'w2' if _SHARD[kind] == 'down' else 'w13'}_weight")
            elif match := _STACKED.match(name):
                prefix, kind = match.group(1).removesuffix(".experts"), match.group(2)
                moe = modules[prefix]
                for expert in range(tensor.shape[0]):
                    if kind == "down_proj":  # [E, H, I]
                        moe.load_expert("down", expert, tensor[expert])
                    else:  # [E, 2I, H]: gate rows then up rows
                        gate, up = tensor[expert].chunk(2, dim=0)
                        moe.load_expert("gate", expert, gate)
                        moe.load_expert("up", expert, up)
                loaded.add(f"{prefix}.{'w2' if kind == 'down_proj' else 'w13'}_weight")
            else:
                yield name, tensor


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Qwen3-MoE: Qwen3 attention (q/k RMSNorm) + sparse MoE with optional top-k renormalisation."""

    decoder_layer_cls = Qwen3MoeDecoderLayer
