"""Write a tiny Hugging Face model as GGUF the way llama.cpp's convert_hf_to_gguf.py does.

Only what the loader tests need, for Qwen2, Phi-3, Gemma 2 and Gemma 3: the metadata keys the
converter writes for them, tensor names from gguf-py's own TensorNameMap (the converter's table,
not the loader's), and the converter's one change to the weights of these architectures: Gemma
norm weights are stored plus one.
"""

from __future__ import annotations

import math

from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, RopeScalingType, get_tensor_name_map
from gguf.quants import quantize as gguf_quantize

# HF architecture -> llama.cpp architecture
GGUF_ARCHITECTURES = {"Qwen2ForCausalLM": MODEL_ARCH.QWEN2, "Phi3ForCausalLM": MODEL_ARCH.PHI3,
                      "Gemma2ForCausalLM": MODEL_ARCH.GEMMA2, "Gemma3ForCausalLM": MODEL_ARCH.GEMMA3}


def _rope(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(rope parameters of full-attention layers, those of sliding layers or None) of a v5 config."""
    params = config.rope_parameters
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def _write_metadata(writer: GGUFWriter, arch: MODEL_ARCH, config: Any) -> None:
    """The keys the converter's set_gguf_parameters writes for `arch` (TextModel's, then the model's)."""
    full, sliding = _rope(config)
    heads, hidden = config.num_attention_heads, config.hidden_size
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if arch != MODEL_ARCH.GEMMA2:  # Gemma2Model writes no RoPE base (llama.cpp's default 10000 is Gemma 2's)
        writer.add_rope_freq_base(full["rope_theta"])
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch == MODEL_ARCH.PHI3:
        writer.add_rope_dimension_count(int(config.partial_rotary_factor * hidden) // heads)
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)
    if arch == MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if arch == MODEL_ARCH.GEMMA3:
        if sliding is not None:
            writer.add_rope_freq_base_swa(sliding["rope_theta"])
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)


def _llama3_rope_factors(rope: dict[str, Any], config: Any) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors: llama3 scaling as one divisor per frequency."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old_len = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf(model: torch.nn.Module, path: str,
               quant: GGMLQuantizationType = GGMLQuantizationType.F32) -> None:
    """Write `model` (a transformers causal LM) to `path`; 2-D tensors in `quant`, the rest F32."""
    config = model.config
    arch = GGUF_ARCHITECTURES[type(model).__name__]
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, arch, config)
    full, _ = _rope(config)
    if arch == MODEL_ARCH.PHI3 and full.get("rope_type") == "longrope":
        # Phi3MiniModel.generate_extra_tensors: LongRoPE's per-frequency factors become tensors.
        writer.add_rope_scaling_type(RopeScalingType.LONGROPE)
        writer.add_tensor("rope_factors_long.weight", np.asarray(full["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(full["short_factor"], np.float32))
    if full.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(full, config))
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the converter writes no output tensor
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if arch in (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3) and hf_name.endswith("norm.weight"):
            data = data + np.float32(1.0)  # Gemma's RMSNorm scales by 1 + weight, llama.cpp's by weight
        if data.ndim == 2 and quant != GGMLQuantizationType.F32:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", gguf_quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
