"""Finds a model's config and weights and builds the model on a device."""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.models.pipeline import is_other_stages_layer
from pagedllm.models.registry import resolve_model_class


def is_gguf(path: str) -> bool:
    """True for a path to a .gguf file."""
    return path.endswith(".gguf") and os.path.isfile(path)


def load_hf_config(path: str) -> dict[str, Any]:
    """The HF-style config dict of a model directory (config.json) or a .gguf file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Model path {path!r} does not exist (give a local HF directory or a .gguf file).")
    if is_gguf(path):
        from pagedllm.loader.gguf_loader import load_gguf_config

        return load_gguf_config(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Model directory {path!r} has no config.json.")
    with open(config_path) as f:
        config = json.load(f)
    if "text_config" in config and "num_hidden_layers" not in config:
        # Multimodal wrappers keep the language model's settings in text_config.
        config = {**config["text_config"], "architectures": config.get("architectures", [])}
    return _add_standard_names(config)


# GPT-2-style config names -> the standard names the engine reads
_GPT2_NAMES = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
               "n_positions": "max_position_embeddings"}


def _add_standard_names(config: dict[str, Any]) -> dict[str, Any]:
    """Also give GPT-2-style fields (n_embd, n_layer, ...) their standard names; the originals stay."""
    for old, new in _GPT2_NAMES.items():
        if old in config and new not in config:
            config[new] = config[old]
    return config


def _iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"Model directory {path!r} has no *.safetensors files (or use --load-format dummy).")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_weights(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under Hugging Face names (GGUF dequantized to fp32), one at a time."""
    if model_config.load_format == "gguf":
        from pagedllm.loader.gguf_loader import iter_gguf_weights

        return iter_gguf_weights(model_config.model, model_config.hf_config)
    return _iter_safetensors(model_config.model)


def _dummy_value(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """A small random tensor that depends only on (seed, name, shape): norms are 1, the rest U(-0.02, 0.02)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-0.02, 0.02, generator=generator)


def iter_dummy_checkpoint(hf_config: dict[str, Any], seed: int, dtype: torch.dtype, device: torch.device,
                          skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Random weights shaped and named like the model's Hugging Face checkpoint, or None if
    transformers cannot describe the model. Each tensor depends only on its name, so every
    tensor-parallel rank slices the same full weights: TP=N gives TP=1's tokens. Tensors whose
    name `skip` accepts are not drawn (a pipeline stage's other stages' layers)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = {k: v for k, v in hf_config.items() if not k.startswith("_") and k != "model_type"}
        hf = AutoConfig.for_model(hf_config["model_type"], **fields)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf)
    except Exception:  # noqa: BLE001 - unknown to this transformers: fall back to per-parameter init
        return None
    shapes = [(name, p.shape) for name, p in skeleton.named_parameters() if skip is None or not skip(name)]
    return ((name, _dummy_value(name, shape, dtype, device, seed)) for name, shape in shapes)


def _initialize_dummy_weights(model: nn.Module, hf_config: dict[str, Any], seed: int, dtype: torch.dtype,
                              device: torch.device) -> None:
    """Small random weights: enough to benchmark, and to run without a checkpoint."""
    checkpoint = iter_dummy_checkpoint(hf_config, seed, dtype, device,
                                       skip=lambda name: is_other_stages_layer(name, model))
    if checkpoint is not None:
        model.load_weights(checkpoint)  # type: ignore[operator]
        return
    for name, param in model.named_parameters():
        param.data.copy_(_dummy_value(name, param.shape, param.dtype, device, seed))


def build_model(hf_config: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The model class the config names, its parameters created uninitialised directly on `device`
    in `dtype` (rotary tables stay fp32); on the meta device it only describes shapes."""
    model_class = resolve_model_class(hf_config.get("architectures") or [])
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(hf_config)
    finally:
        torch.set_default_dtype(previous_dtype)


def get_model(model_config: ModelConfig, device: torch.device, seed: int = 0) -> nn.Module:
    """Build the model class its config names, load its weights, and move it to `device`."""
    dtype = getattr(torch, model_config.dtype)
    model = build_model({**model_config.hf_config, "_max_model_len": model_config.max_model_len}, dtype, device)
    if model_config.load_format == "dummy":
        _initialize_dummy_weights(model, model_config.hf_config, seed, dtype, device)
    else:
        loaded = model.load_weights(iter_weights(model_config))
        expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"Checkpoint at {model_config.model!r} lacks weights for: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if model_config.quantization is not None:
        from pagedllm.layers.quantization import quantize_model

        quantize_model(model, model_config.quantization)
    return model.eval()
