"""Gemma 2 and Gemma 3 (text-only `Gemma3ForCausalLM`): Llama-shaped decoders with Gemma's extras.

What differs from Llama, each as in Hugging Face's modeling_gemma2.py / modeling_gemma3.py:
- token embeddings are multiplied by sqrt(hidden_size), the factor rounded to the model dtype;
- the MLP is GeGLU (gelu with the tanh approximation, `hidden_activation`);
- every RMSNorm scales by (1 + weight), and each block norms both before and after its
  attention and its MLP (input / post_attention / pre_feedforward / post_feedforward);
- attention scores are scaled by `query_pre_attn_scalar ** -0.5`; Gemma 2 soft-caps them
  (`attn_logit_softcapping`) and both soft-cap the final logits (`final_logit_softcapping`);
- Gemma 3 normalizes q and k per head, and its sliding (local) layers use their own RoPE base
  (`rope_local_base_freq` / `rope_parameters["sliding_attention"]`) while global layers use
  `rope_theta` with the rope scaling;
- sliding-window and global layers alternate (`layer_types`, or Gemma 2's every other layer,
  Gemma 3's `sliding_window_pattern`). The global layers read every token, so the KV cache
  manager frees no blocks for these models (`sliding_window.kv_cache_sliding_window`).

The attention, QKV / gate-up fusion and checkpoint loading are Llama's (llama.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.activation import GeluAndMul
from pagedllm.layers.layernorm import GemmaRMSNorm
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.layers.vocab import VocabParallelEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel
from pagedllm.models.pipeline import first_stage_module, last_stage_module, make_layers
from pagedllm.models.sliding_window import layer_sliding_windows

# hidden_activation -> GeluAndMul's approximation
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _is_gemma3(config: dict[str, Any]) -> bool:
    return config["model_type"] == "gemma3_text"


def gemma3_rope_parameters(config: dict[str, Any], sliding: bool) -> dict[str, Any]:
    """RoPE settings of Gemma 3's local (sliding) or global layers, from either config form.

    transformers v5 nests them per layer type in `rope_parameters`; older configs give
    `rope_local_base_freq` for local layers and `rope_theta` + `rope_scaling` for global ones.
    """
    layer_type = "sliding_attention" if sliding else "full_attention"
    nested = config.get("rope_parameters") or {}
    if layer_type in nested:
        params = dict(nested[layer_type] or {})
    elif sliding:
        params = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    else:
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 1_000_000.0)}
    return rope_parameters({"rope_parameters": params})


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's score scale, soft cap (Gemma 2) and q/k norm (Gemma 3)."""

    def __init__(self, config: dict[str, Any], rotary: RotaryEmbedding, layer_idx: int) -> None:
        super().__init__(config, rotary, layer_idx)
        if _is_gemma3(config):
            self.qk_norm = True
            self.q_norm = GemmaRMSNorm(self.head_dim, config["rms_norm_eps"])
            self.k_norm = GemmaRMSNorm(self.head_dim, config["rms_norm_eps"])
        # Hugging Face's Gemma 3 attention never passes attn_logit_softcapping on: ignore it there.
        soft_cap = None if _is_gemma3(config) else config.get("attn_logit_softcapping")
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              float(config["query_pre_attn_scalar"]) ** -0.5,
                              sliding_window=layer_sliding_windows(config)[layer_idx],
                              logits_soft_cap=soft_cap)


class GemmaDecoderLayer(nn.Module):
    """Gemma block: norms around both attention and MLP, residual adds fused into the next norm."""

    def __init__(self, config: dict[str, Any], rotary: RotaryEmbedding, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config["rms_norm_eps"]
        activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in _GELU_APPROXIMATIONS:
            raise ValueError(f"hidden_activation {activation!r} is not supported by Gemma "
                             f"(supported: {', '.join(_GELU_APPROXIMATIONS)}).")
        self.self_attn = GemmaAttention(config, rotary, layer_idx)
        self.mlp = LlamaMLP(config, act=GeluAndMul(_GELU_APPROXIMATIONS[activation]))
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block; returns (hidden, residual) with the residual add deferred to the next norm."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(LlamaModel):
    """Scaled embedding, decoder layers (each given its layer type's RoPE) and final norm; Llama's
    forward (and pipeline stages), Gemma's modules."""

    def __init__(self, config: dict[str, Any], layer_cls: type[nn.Module] = GemmaDecoderLayer) -> None:
        nn.Module.__init__(self)  # Llama's modules are not built: Gemma's replace every one of them
        hidden = config["hidden_size"]
        self.embed_tokens = first_stage_module(lambda: VocabParallelEmbedding(config["vocab_size"], hidden))
        # Rounded to the model dtype in forward, as Hugging Face does (sqrt(3072) -> 55.5 in bf16).
        self.register_buffer("normalizer", torch.tensor(hidden**0.5, dtype=torch.float32), persistent=False)
        head_dim = config["head_dim"]
        # Positions never reach max_model_len: a table that long suffices (Gemma 3 allows 128k).
        max_position = config.get("_max_model_len") or config["max_position_embeddings"]
        windows = layer_sliding_windows(config)
        if _is_gemma3(config):
            local = RotaryEmbedding(head_dim, head_dim, max_position, gemma3_rope_parameters(config, sliding=True))
            full = RotaryEmbedding(head_dim, head_dim, max_position, gemma3_rope_parameters(config, sliding=False))
            rotaries = [full if window is None else local for window in windows]
        else:
            rotaries = [RotaryEmbedding(head_dim, head_dim, max_position, rope_parameters(config))] * len(windows)
        self.start_layer, self.end_layer, self.layers = make_layers(
            len(rotaries), lambda i: layer_cls(config, rotaries[i], i))
        self.norm = last_stage_module(lambda: GemmaRMSNorm(hidden, config["rms_norm_eps"]))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> embeddings scaled by sqrt(hidden_size) [T, hidden]."""
        hidden = self.embed_tokens(input_ids)
        return hidden * self.normalizer.to(hidden.dtype)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 causal LM: attention and final logit soft-capping, every other layer sliding."""

    decoder_layer_cls = GemmaDecoderLayer
    model_cls = GemmaModel
    # Hugging Face's config defaults, for checkpoints whose config.json leaves them out.
    config_defaults: dict[str, Any] = dict(
        model_type="gemma2", head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
    )

    def __init__(self, config: dict[str, Any]) -> None:
        config = {**self.config_defaults, **config}
        if config.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True makes an encoder, not a causal LM: not supported.")
        super().__init__(config)
        self.final_logit_softcapping: float | None = config.get("final_logit_softcapping")

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Vocabulary logits [N, vocab] (`gather=False`: this rank's slice), soft-capped to
        cap * tanh(logits / cap) when configured."""
        logits = super().compute_logits(hidden, gather)
        cap = self.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text causal LM: q/k norm, local/global RoPE bases, no logit soft-capping by default."""

    config_defaults: dict[str, Any] = dict(
        Gemma2ForCausalLM.config_defaults, model_type="gemma3_text", max_position_embeddings=131_072,
        sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    )
