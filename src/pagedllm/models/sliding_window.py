"""Which attention layers of a Hugging Face config use a sliding window, and how wide it is.

Hugging Face's rule for a window W: the query at position p sees the keys p - W + 1 .. p.
Configs say which layers slide in one of three ways, tried in this order:
- `layer_types`: "sliding_attention" / "full_attention" per layer (transformers v4.53+);
- the model type's own pattern: Gemma 2 alternates (even layers slide), Gemma 3 slides on all
  but every `sliding_window_pattern`-th layer, Qwen2/Qwen3 slide from `max_window_layers` on;
- otherwise (Mistral, Mixtral, Phi-3) every layer slides when `sliding_window` is set.
`use_sliding_window: false` (Qwen2/Qwen3) turns every window off.
"""

from __future__ import annotations

from typing import Any

_QWEN_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def layer_sliding_windows(config: dict[str, Any]) -> list[int | None]:
    """The sliding window of each attention layer, in layer order (None: full attention)."""
    num_layers = int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window", True) is False:
        return [None] * num_layers
    window = int(window)
    layer_types = config.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types lists {len(layer_types)} layers, the model has {num_layers}.")
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"Unsupported attention layer types {sorted(unknown)}; "
                             "supported: sliding_attention, full_attention.")
        return [window if t == "sliding_attention" else None for t in layer_types]
    model_type = config.get("model_type")
    if model_type == "gemma2":
        return [window if (i + 1) % 2 else None for i in range(num_layers)]
    if model_type == "gemma3_text":
        pattern = int(config.get("sliding_window_pattern", 6))
        return [window if (i + 1) % pattern else None for i in range(num_layers)]
    if model_type in _QWEN_TYPES:
        first = int(config.get("max_window_layers", num_layers))
        return [window if i >= first else None for i in range(num_layers)]
    return [window] * num_layers


def kv_cache_sliding_window(config: dict[str, Any]) -> int | None:
    """The window the KV cache manager may free blocks behind: set only when EVERY layer slides.

    Then a block whose tokens all lie before every future query's window is never read again.
    With one full-attention layer (Gemma 2/3 mix both kinds) every block stays needed: None.
    """
    windows = layer_sliding_windows(config)
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)
