"""Load a GGUF checkpoint: an HF-style config from its metadata and float32 weights under HF names.

The file is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view per
metadata array element, which costs ~1.7 s on the embedded model's 100k tokenizer strings, while
this parser reads the same metadata in well under 0.1 s. Tensor data is memory-mapped, and the common
types (F32, F16, BF16, Q8_0, Q4_0, Q4_1) are dequantized with torch ops that give bit-identical
results to `gguf.quants.dequantize`, which handles every other type (K-quants, IQ-quants, ...).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: struct format of scalars, numpy dtype of arrays of them.
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

# GGUF tensor name (after `blk.{i}.`) -> HF parameter name (after `model.layers.{i}.`), per
# architecture: llama.cpp's names (gguf-py's TensorNameMap) read backwards.
_LLAMA_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma norms around both attention and MLP: GGUF's ffn_norm is HF's *pre*-feedforward norm here.
_GEMMA_LAYER_TENSORS = {
    **_LLAMA_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps its checkpoint's fused tensors: ffn_up holds gate and up stacked (HF's gate_up_proj).
_PHI3_LAYER_TENSORS = {
    **{k: v for k, v in _LLAMA_LAYER_TENSORS.items() if k != "ffn_gate"},
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp stores that are no HF parameter. Phi-3's LongRoPE factors become the config's
# rope_scaling; llama3 RoPE factors (the converter writes them instead of rope_scaling) become the
# config's per-frequency divisors `inv_freq_factors`, which the rotary layer applies.
_SKIPPED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto a Hugging Face model.

    `permuted_qk`: llama.cpp's converter interleaved the rotary halves of q/k rows (its `llama`
    architecture only; transformers undoes it for that architecture alone). `norm_offset`: the
    converter stored every `*norm.weight` plus this (Gemma's RMSNorm scales by 1 + weight, and
    llama.cpp's by weight), so the loader subtracts it again.
    """

    hf_architecture: str
    model_type: str
    layer_tensors: dict[str, str]
    permuted_qk: bool = False
    norm_offset: float = 0.0


# llama.cpp architecture name (`general.architecture`) -> its mapping.
GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", _LLAMA_LAYER_TENSORS, permuted_qk=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", _LLAMA_LAYER_TENSORS),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", _LLAMA_LAYER_TENSORS),
    "phi3": GGUFArchitecture("Phi3ForCausalLM", "phi3", _PHI3_LAYER_TENSORS),
    "gemma2": GGUFArchitecture("Gemma2ForCausalLM", "gemma2", _GEMMA_LAYER_TENSORS, norm_offset=1.0),
    "gemma3": GGUFArchitecture("Gemma3ForCausalLM", "gemma3_text", _GEMMA_LAYER_TENSORS, norm_offset=1.0),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in a GGUF file; `shape` is in PyTorch order (GGUF lists dims reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file: every metadata key/value and the tensor directory."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Sequential little-endian reader over a buffer; errors name the file, since they mean corruption."""

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise ValueError(f"GGUF file {self.path} is truncated or corrupt (string past end of file).")
        text = self.buf[self.pos:end].decode("utf-8")
        self.pos = end
        return text

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type == _STRING:
                # The hot loop of the whole parse (tokenizer vocab and merges): keep it tight.
                unpack, buf, pos, items = struct.Struct("<Q").unpack_from, self.buf, self.pos, []
                for _ in range(count):
                    (length,) = unpack(buf, pos)
                    items.append(buf[pos + 8:pos + 8 + length].decode("utf-8"))
                    pos += 8 + length
                self.pos = pos
                return items
            if item_type in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[item_type]).newbyteorder("<")
                if self.pos + count * dtype.itemsize > len(self.buf):
                    raise ValueError(f"GGUF file {self.path} is truncated or corrupt (array past end of file).")
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return items
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"GGUF file {self.path} has an unknown metadata value type {value_type}.")
        return self.scalar(_SCALAR_FORMATS[value_type])


def _read_header(cur: _Cursor, path: str) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    """Metadata, raw tensor infos (name, GGUF dims, type id, relative offset) and the header's end offset."""
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported.")
    num_tensors, num_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw_infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    return metadata, raw_infos, cur.pos


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory (tensor data is not read)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF').")
        try:
            metadata, raw_infos, header_end = _read_header(_Cursor(buf, path), path)
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"GGUF file {path} is truncated or corrupt: "
                             f"its header cannot be parsed ({exc}).") from exc
        file_size = len(buf)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, dims, type_id, rel_offset in raw_infos:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"Tensor {name} in {path} has unknown GGML type id {type_id}.") from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims and dims[0] % block_size:
            raise ValueError(f"Tensor {name} in {path}: row length {dims[0]} is not a multiple of "
                             f"the {ggml_type.name} block size {block_size}.")
        nbytes = math.prod(dims) // block_size * type_size
        offset = data_start + rel_offset
        if offset + nbytes > file_size:
            raise ValueError(f"GGUF file {path} is truncated: tensor {name} ends past the end of the file.")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes)
    return GGUFFile(path, metadata, tensors)


def _architecture(gguf: GGUFFile) -> tuple[str, GGUFArchitecture]:
    """The file's llama.cpp architecture name and mapping; a clear error for unsupported ones."""
    arch = gguf.metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF file {gguf.path} has architecture {arch!r}, which pagedllm cannot load; "
                         f"supported: {sorted(GGUF_ARCHITECTURES)}.")
    return arch, GGUF_ARCHITECTURES[arch]


_REQUIRED = object()
_MetadataGetter = Callable[..., Any]  # get(key without the "{arch}." prefix, default) -> value


def load_gguf_config(path: str, gguf: GGUFFile | None = None) -> dict[str, Any]:
    """An HF-style config dict (the keys a config.json would have) from a GGUF file's metadata.

    Keys llama.cpp does not store are given the values llama.cpp itself assumes for the
    architecture, so the model computes what llama.cpp computes from the same file.
    """
    gguf = gguf or read_gguf(path)
    meta = gguf.metadata
    arch, spec = _architecture(gguf)

    def get(key: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ValueError(f"GGUF file {path} lacks the metadata key {arch}.{key}.")
        return value

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, np.ndarray):  # per-layer counts in some files
        num_kv_heads = int(num_kv_heads.max())
    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "intermediate_size": int(get("feed_forward_length")),
        "vocab_size": _vocab_size(gguf, get),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "head_dim": int(get("attention.key_length", hidden_size // num_heads)),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    scaling_type = get("rope.scaling.type", None)
    if scaling_type not in (None, "none"):
        rope_scaling: dict[str, Any] = {"rope_type": scaling_type, "type": scaling_type}
        if get("rope.scaling.factor", None) is not None:
            rope_scaling["factor"] = float(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length", None) is not None:
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        config["rope_scaling"] = rope_scaling
    if "rope_freqs.weight" in gguf.tensors:
        factors = read_gguf_tensor(gguf, "rope_freqs.weight").float().flatten().tolist()
        config["rope_scaling"] = {**config.get("rope_scaling", {"rope_type": "default"}), "inv_freq_factors": factors}
    if arch in _ARCHITECTURE_CONFIG:
        config.update(_ARCHITECTURE_CONFIG[arch](gguf, get, config))
    return config


def _vocab_size(gguf: GGUFFile, get: _MetadataGetter) -> int:
    """Rows of the embedding (what the weights need), else the stated vocab size, else the tokenizer's."""
    # Gemma 3 converters drop the embedding's unused rows, so the HF vocab size may not fit the tensor.
    if "token_embd.weight" in gguf.tensors:
        return gguf.tensors["token_embd.weight"].shape[0]
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    vocab_size = get("vocab_size", len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise ValueError(f"GGUF file {gguf.path} states no vocab size, has no tokenizer and no token_embd.")
    return int(vocab_size)


def _phi3_config(gguf: GGUFFile, get: _MetadataGetter, config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's partial rotary, sliding window and LongRoPE (llama.cpp's Phi3MiniModel, inverted)."""
    head_dim = config["head_dim"]
    # The converter writes int(partial_rotary_factor * hidden) // heads rotary dimensions.
    rotary_dim = int(get("rope.dimension_count", head_dim))
    # 0 marks "no window" (Phi-4). llama.cpp currently ignores Phi-3 windows; Hugging Face applies
    # them, and this config is the one the original config.json had.
    window = int(get("attention.sliding_window", 0))
    extra: dict[str, Any] = {"partial_rotary_factor": rotary_dim / head_dim, "sliding_window": window or None}
    original = get("rope.scaling.original_context_length", None)
    if original is not None:
        extra["original_max_position_embeddings"] = int(original)
    if "rope_factors_long.weight" in gguf.tensors:
        # LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): its per-frequency factors are tensors in GGUF.
        extra["rope_scaling"] = {
            "rope_type": "longrope", "type": "longrope",
            "long_factor": read_gguf_tensor(gguf, "rope_factors_long.weight").tolist(),
            "short_factor": read_gguf_tensor(gguf, "rope_factors_short.weight").tolist(),
            "original_max_position_embeddings": int(original or config["max_position_embeddings"]),
        }
    return extra


# Layers of the 27B models, which llama.cpp recognises by depth alone.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _gemma_config(gguf: GGUFFile, get: _MetadataGetter, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 / 3 settings GGUF stores or llama.cpp hard-codes (llama-model.cpp's hparams)."""
    gemma3 = config["model_type"] == "gemma3_text"
    # The attention scale is no metadata: llama.cpp uses hidden / heads for the 27B models (as
    # their query_pre_attn_scalar says) and head_dim for every other size.
    is_27b = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[config["model_type"]]
    scalar = config["hidden_size"] // config["num_attention_heads"] if is_27b else config["head_dim"]
    # Gemma 2 files without a window get llama.cpp's 4096; a Gemma 3 file without one has none.
    window = int(get("attention.sliding_window", 0 if gemma3 else 4096))
    extra: dict[str, Any] = {
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar, "sliding_window": window or None,
    }
    if gemma3:
        # Five local layers per global one, the local ones on RoPE base 10000 (llama.cpp fixes both;
        # newer converters also write the local base).
        extra.update(sliding_window_pattern=6, rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
                     attn_logit_softcapping=None,
                     final_logit_softcapping=float(get("final_logit_softcapping", 0.0)) or None)
    else:
        extra.update(attn_logit_softcapping=float(get("attn_logit_softcapping", 50.0)),
                     final_logit_softcapping=float(get("final_logit_softcapping", 30.0)))
    return extra


# Architecture-specific config keys, applied over the common ones.
_ARCHITECTURE_CONFIG: dict[str, Callable[[GGUFFile, _MetadataGetter, dict[str, Any]], dict[str, Any]]] = {
    "phi3": _phi3_config,
    "gemma2": _gemma_config,
    "gemma3": _gemma_config,
}


def _hf_name(gguf_name: str, spec: GGUFArchitecture, path: str) -> str | None:
    """HF parameter name of a GGUF tensor; None for tensors that are no HF parameter."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    if gguf_name in _SKIPPED_TENSORS:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in spec.layer_tensors:
        return f"model.layers.{parts[1]}.{spec.layer_tensors[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF file {path} holds tensor {gguf_name!r}, which pagedllm does not know how to "
                     "map to a Hugging Face parameter; the architecture is not supported as stored.")


def _unpermute_rows(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's rotary permutation of q/k (interleaved -> half-split pairs)."""
    if num_rows % (2 * num_heads):
        raise ValueError(f"Cannot undo the rotary permutation: {num_rows} rows for {num_heads} heads.")
    half = num_rows // num_heads // 2
    # HF row (h, j, i) with j in {0, 1}, i < half comes from GGUF row h*head_dim + 2*i + j.
    return torch.arange(num_rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)


def _f16_scale(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 scale at byte `start` of every block, as float32 of shape (num_blocks, 1)."""
    return blocks[:, start:start + 2].view(torch.float16).float()


def _nibbles(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """4-bit values of every block as float32: low nibbles of the 16 bytes first, then high nibbles."""
    packed = blocks[:, start:]
    values = torch.empty(blocks.shape[0], 2 * packed.shape[1], dtype=torch.float32)
    values[:, :packed.shape[1]] = packed & 0x0F
    values[:, packed.shape[1]:] = packed >> 4
    return values


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread, restoring the caller's setting afterwards."""
    # Dequantizing is memory-bound: a second thread gains nothing, and when another process holds a
    # core, OpenMP's barriers over these many small ops made loading 30x slower (0.2 s -> 6-11 s).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dequantize_tensor(raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 tensor of `shape` from raw GGML bytes; bit-identical to `gguf.quants.dequantize`."""
    # Each formula below keeps numpy's operation order (d * q, then + m) so roundings agree exactly.
    if ggml_type == GGMLQuantizationType.F32:
        out = raw.view(torch.float32)
    elif ggml_type == GGMLQuantizationType.F16:
        out = raw.view(torch.float16).float()
    elif ggml_type == GGMLQuantizationType.BF16:
        out = raw.view(torch.bfloat16).float()
    elif ggml_type == GGMLQuantizationType.Q8_0:
        blocks = raw.view(-1, 34)
        out = blocks[:, 2:].view(torch.int8).float().mul_(_f16_scale(blocks, 0))
    elif ggml_type == GGMLQuantizationType.Q4_0:
        blocks = raw.view(-1, 18)
        out = _nibbles(blocks, 2).sub_(8.0).mul_(_f16_scale(blocks, 0))
    elif ggml_type == GGMLQuantizationType.Q4_1:
        blocks = raw.view(-1, 20)
        out = _nibbles(blocks, 4).mul_(_f16_scale(blocks, 0)).add_(_f16_scale(blocks, 2))
    else:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        rows = raw.numpy().reshape(-1, shape[-1] // block_size * type_size)
        out = torch.from_numpy(gguf_dequantize(rows, ggml_type))
    return out.reshape(shape)


def _map_file(path: str) -> np.memmap:
    # mode "c": torch needs a writable array to wrap without a copy; writes would stay private.
    return np.memmap(path, dtype=np.uint8, mode="c")


def _raw_bytes(data: np.memmap, info: GGUFTensorInfo) -> torch.Tensor:
    return torch.from_numpy(data[info.offset:info.offset + info.nbytes])


def read_gguf_tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    """One tensor of the file as stored (no HF transformation undone), dequantized to float32."""
    info = gguf.tensors[name]
    with _one_thread():
        return dequantize_tensor(_raw_bytes(_map_file(gguf.path), info), info.ggml_type, info.shape).clone()


def iter_gguf_weights(path: str, config: dict[str, Any],
                      gguf: GGUFFile | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, float32 tensor in HF shape) for every weight of a GGUF file.

    Data is memory-mapped copy-on-write: F32 tensors are views of the mapping (no copy), quantized
    ones are dequantized straight from it. What llama.cpp's converter changed is undone as
    transformers' GGUF loader undoes it, so the weights equal the original checkpoint's: the q/k
    rotary permutation (llama architecture) and the +1 on every norm weight (Gemma).
    """
    gguf = gguf or read_gguf(path)
    _, spec = _architecture(gguf)
    num_heads = int(config["num_attention_heads"])
    num_kv_heads = int(config.get("num_key_value_heads", num_heads))
    data = _map_file(path)
    for info in gguf.tensors.values():
        name = _hf_name(info.name, spec, path)
        if name is None:
            continue
        raw = _raw_bytes(data, info)
        with _one_thread():
            if spec.permuted_qk and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                heads = num_heads if ".q_proj." in name else num_kv_heads
                # Permute the raw rows before dequantizing: each row's blocks are self-contained, and
                # the raw copy is several times smaller than a float32 one.
                num_rows = info.shape[0]
                raw = raw.view(num_rows, -1)[_unpermute_rows(num_rows, heads)].reshape(-1)
            weight = dequantize_tensor(raw, info.ggml_type, info.shape)
            if spec.norm_offset and info.name.endswith("norm.weight"):
                # (w + 1) - 1 in float32 may differ from w in the last bits, but for stored values
                # >= 0.5 the 1 + weight the model computes is exactly the stored float32 value.
                weight = weight - spec.norm_offset
        yield name, weight
