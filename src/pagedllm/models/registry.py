"""Maps a config's `architectures` name to the model class that implements it."""

from __future__ import annotations

import importlib

from torch import nn

# architecture name -> (module under pagedllm.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("mixtral", "Qwen3MoeForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
}


def supported_architectures() -> list[str]:
    """Every architecture name the engine can run."""
    return sorted(_MODELS)


def resolve_model_class(architectures: list[str]) -> type[nn.Module]:
    """The model class for the first supported name in `architectures`; a clear error otherwise."""
    for name in architectures:
        if name in _MODELS:
            module_name, class_name = _MODELS[name]
            module = importlib.import_module(f"pagedllm.models.{module_name}")
            return getattr(module, class_name)
    raise ValueError(
        f"Model architectures {architectures} are not supported. "
        f"Supported architectures: {', '.join(supported_architectures())}."
    )
