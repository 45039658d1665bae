"""Model loading: configs and weights from HF directories, GGUF files, or random (dummy) weights."""

from pagedllm.loader.model_loader import get_model, load_hf_config

__all__ = ["get_model", "load_hf_config"]
