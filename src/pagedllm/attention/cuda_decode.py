"""Decode attention for small batches as one CUDA kernel (`cuda_decode.cu`), sm_90+.

At batch 1 the decode attention reads a few hundred KB and is pure latency: the Triton path
(a split-KV kernel, then a kernel combining the partitions) spent ~10 us per layer on an H200
between the QKV projection's end and the O projection's start, at either tensor-parallel size.
This kernel serves one (request, KV head) with a thread-block cluster whose CTAs combine their
partials through distributed shared memory (no second kernel), loads everything it can in its
first round trip, and folds the rotary and this step's K/V write in as the Triton kernel does.

It serves decodes of bf16 models with head_dim 128, at most 8 query heads per KV head, no
sliding window or soft cap, page sizes that are multiples of its chunk, when few enough
(request, KV head) pairs leave room for clusters of at least two CTAs (`cluster_size`), and
contexts up to MAX_CONTEXT (the step's `max_seq_len`: for CUDA graphs the bound they were
captured for). `PAGEDLLM_CUDA_DECODE_ATTENTION=0` keeps the Triton kernels everywhere. Built
on first use (needs nvcc); when the build fails the Triton kernels serve. CUDA-graph
capturable, no host syncs.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from pagedllm.cuda_extension import load_extension
from pagedllm.envs import on_by_default

if TYPE_CHECKING:
    from pagedllm.attention.triton_backend import NewTokens

ENV_VAR = "PAGEDLLM_CUDA_DECODE_ATTENTION"
_SOURCE = Path(__file__).with_name("cuda_decode.cu")
HEAD_DIM = 128
MAX_GROUP = 8
MAX_CLUSTER = 8  # the portable size; 16 (sm_90, non-portable) was slower on an H200 (docs/benchmarks.md)
WARPS = 8  # per CTA: 4 or 8 (a cluster's warps share the context's chunks)
# Each warp walks its chunks one after the other, so long contexts are the Triton kernel's (it
# spreads them over every SM). On an H200 at batch 1 (docs/benchmarks.md, seventeenth session)
# this kernel took 6.3 against 7.1 us per layer at 384 tokens, 8.8 against 8.4 at 1024 with 4
# KV heads (TP=2 of Llama-3.1-8B), and broke even at ~2500 tokens with 8: the bound is the
# smaller crossover. CUDA graphs: decodes with contexts up to this replay graphs captured for
# it (cuda_graph.py), longer ones those of max_model_len.
MAX_CONTEXT = 768


def enabled_by_env() -> bool:
    """False when PAGEDLLM_CUDA_DECODE_ATTENTION is '0' or 'false' (read at each call, so a
    CUDA graph captured after a change follows it)."""
    return on_by_default(ENV_VAR)


def chunk_tokens(group: int) -> int:
    """Tokens per chunk for `group` query heads per KV head (cuda_decode.cu's kChunk)."""
    padded = 1 << (group - 1).bit_length()
    return 32 // padded if padded >= 4 else 8


def cluster_size(num_decodes: int, num_kv_heads: int, sms: int) -> int:
    """CTAs per (request, KV head): a power of two up to MAX_CLUSTER that keeps the grid within
    one CTA per SM (1 when the pairs alone fill the GPU)."""
    pairs = max(1, num_decodes * num_kv_heads)
    size = max(1, min(MAX_CLUSTER, sms // pairs, 16))
    return 1 << (size.bit_length() - 1)


@functools.cache
def _module() -> ModuleType | None:
    """The compiled extension, or None when it cannot be built here."""
    return load_extension("pagedllm_cuda_decode", _SOURCE, "CUDA decode attention kernel")


def available() -> bool:
    """Whether the kernel is switched on and built here (building it on the first call)."""
    return enabled_by_env() and _module() is not None


@functools.cache
def _device_ok(device_index: int) -> tuple[bool, int]:
    """Whether the device has clusters (sm_90+), and its SM count."""
    props = torch.cuda.get_device_properties(device_index)
    return props.major >= 9, props.multi_processor_count


def _vectors_ok(t: torch.Tensor, bytes_: int) -> bool:
    """Whether t's rows can be read in `bytes_`-byte vectors (aligned start and strides)."""
    items = bytes_ // t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % bytes_ == 0
            and all(s % items == 0 for s in t.stride()[:-1]))


def serves_layer(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page: int,
                 sliding_window: int | None, logits_soft_cap: float | None, num_decodes: int,
                 device: torch.device) -> bool:
    """Whether this kernel would take `num_decodes` decodes of an attention layer of these
    shapes on `device`, contexts permitting (the checks that need no tensors)."""
    if device.type != "cuda" or num_decodes < 1 or not enabled_by_env():
        return False
    if sliding_window is not None or logits_soft_cap is not None or dtype != torch.bfloat16:
        return False
    has_clusters, sms = _device_ok(device.index if device.index is not None else torch.cuda.current_device())
    if not has_clusters or head_dim != HEAD_DIM or num_heads % num_kv_heads:
        return False
    group = num_heads // num_kv_heads
    return group <= MAX_GROUP and page % chunk_tokens(group) == 0 and cluster_size(num_decodes, num_kv_heads, sms) >= 2


def serves(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor,
           block_tables: torch.Tensor, num_decodes: int, max_seq_len: int, sliding_window: int | None,
           logits_soft_cap: float | None, new_tokens: NewTokens | None) -> bool:
    """Whether this kernel takes the decodes of this batch (see the module docstring)."""
    if max_seq_len > MAX_CONTEXT or query.dim() != 3 or kv_cache.dim() != 5:
        return False
    _, _, page, num_kv_heads, head_dim = kv_cache.shape
    if query.shape[2] != head_dim or not serves_layer(query.shape[1], num_kv_heads, head_dim, query.dtype, page,
                                                      sliding_window, logits_soft_cap, num_decodes, query.device):
        return False
    if kv_cache.dtype != torch.bfloat16 or out.dtype != torch.bfloat16:
        return False
    if seq_lens.dtype != torch.int64 or block_tables.dtype != torch.int64 or block_tables.stride(-1) != 1:
        return False
    if not (_vectors_ok(query, 8) and _vectors_ok(out, 8) and _vectors_ok(kv_cache, 8)):
        return False
    if new_tokens is not None:
        if not (_vectors_ok(new_tokens.key, 8) and _vectors_ok(new_tokens.value, 8)
                and new_tokens.key.dtype == torch.bfloat16 and new_tokens.value.dtype == torch.bfloat16
                and new_tokens.slot_mapping.dtype == torch.int64):
            return False
        if new_tokens.positions is not None:
            cos, sin = new_tokens.cos_cache, new_tokens.sin_cache
            if (new_tokens.positions.dtype != torch.int64 or cos is None or sin is None
                    or cos.dtype != torch.float32 or cos.shape[-1] != HEAD_DIM or cos.stride() != sin.stride()
                    or not (_vectors_ok(cos, 16) and _vectors_ok(sin, 16))):
                return False
    return available()


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, num_decodes: int, scale: float, out: torch.Tensor,
                     new_tokens: NewTokens | None = None, pdl: int = 1) -> torch.Tensor:
    """Attention of decode tokens [0, num_decodes) (query [T, H, 128]) into out [T, H, 128].

    The caller checked `serves`. `new_tokens`: this step's keys/values are written (and rotated)
    here, as by the Triton decode kernel. `pdl` (triton_backend.attention_pdl): >= 1 lets the
    next kernel launch as this one starts (the O projection's GEMV waits for this grid before
    reading the output), >= 2 also launches this kernel with programmatic dependent launch.
    """
    module = _module()
    assert module is not None
    _, _, page, num_kv_heads, _ = kv_cache.shape
    _, sms = _device_ok(query.device.index or 0)
    nt = new_tokens
    rope = nt is not None and nt.positions is not None
    module.decode(query, kv_cache[0], kv_cache[1], out, seq_lens, block_tables,
                  nt.key if nt else None, nt.value if nt else None, nt.slot_mapping if nt else None,
                  nt.positions if rope else None, nt.cos_cache if rope else None, nt.sin_cache if rope else None,
                  num_decodes, scale * math.log2(math.e), cluster_size(num_decodes, num_kv_heads, sms), WARPS,
                  pdl >= 1, pdl >= 2)
    return out
