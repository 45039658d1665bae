"""One decode token's attention and output projection as one CUDA kernel (`cuda_decode_o.cu`).

At batch 1 the hand-off from the decode attention (cuda_decode.py) to the O projection's GEMV
(layers/cuda_gemv.py) cost a layer ~15 us on 2 x H200 at TP=2, of which the O weight stream is
~3.5: two kernel boundaries, the attention's round trips, O's wait for the attention grid. This
kernel streams the O weight from its first instant while thread-block clusters compute the
attention (each cluster all of it, so no CTA waits for another cluster) and reduce its rows
against it; the rows go to `out` or, at two ranks, into the all-reduce site's buffers for the
next add + RMSNorm GEMV (cuda_gemv.Exchange). `PAGEDLLM_DECODE_O=1` switches it on.

It serves one decode token (batch 1) where the CUDA decode kernel would (`cuda_decode.serves`),
with a bf16 O weight [N, heads x 128] without bias and at most 16 KV heads. CUDA-graph
capturable, no host syncs (the cluster count is asked once per shape).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from pagedllm.cuda_extension import load_extension

if TYPE_CHECKING:
    from pagedllm.attention.triton_backend import NewTokens
    from pagedllm.layers.cuda_gemv import Exchange

ENV_VAR = "PAGEDLLM_DECODE_O"
CLUSTER_ENV_VAR = "PAGEDLLM_DECODE_O_CLUSTER"  # CTAs per cluster: 16 (default) or 8
AHEAD_ENV_VAR = "PAGEDLLM_DECODE_O_AHEAD"  # weight stages in flight before the operand (0: all)
GO_ENV_VAR = "PAGEDLLM_DECODE_O_GO"  # 1 / 2: the rest of the stream after the query / the chunks
_SOURCE = Path(__file__).with_name("cuda_decode_o.cu")
_OPERAND_OFFSET = 1024  # cuda_decode_o.cu's kOperandOffset
_SMEM_LIMIT = 227 * 1024
_MAX_RING_BYTES = 192 * 1024
_STAGE_BYTES = 32 * 1024
_MAX_SLOTS = 32


def enabled_by_env() -> bool:
    """True when PAGEDLLM_DECODE_O is '1' or 'true' (off by default until measured)."""
    return os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true")


@functools.cache
def _module() -> ModuleType | None:
    return load_extension("pagedllm_cuda_decode_o", _SOURCE, "CUDA decode attention + O projection kernel")


def _padded_group(group: int) -> int:
    return 1 << (group - 1).bit_length()


def _static_smem(group: int) -> int:
    """The kernel's static shared memory for `group` query heads per KV head (upper bound)."""
    return 1024 + 4700 * _padded_group(group) + 512


def splits_per_head(num_kv_heads: int) -> int:
    """CTAs per KV head in a cluster of PAGEDLLM_DECODE_O_CLUSTER (16 or 8) CTAs (0: none fits)."""
    cluster = int(os.environ.get(CLUSTER_ENV_VAR, "") or 16)
    splits = min(8, cluster // num_kv_heads) if num_kv_heads <= cluster else 0
    return 1 << (splits.bit_length() - 1) if splits else 0


def plan(n: int, k: int, group: int) -> tuple[int, int] | None:
    """(rows per stage, stages in the ring) for an O weight [n, k], or None if none fits."""
    row_bytes = 2 * k
    rows = max(1, min(16, _STAGE_BYTES // row_bytes))
    ring_offset = (_OPERAND_OFFSET + row_bytes + 127) // 128 * 128
    room = _SMEM_LIMIT - _static_smem(group) - ring_offset
    slots = min(_MAX_SLOTS, _MAX_RING_BYTES // (rows * row_bytes), room // (rows * row_bytes))
    return (rows, slots) if slots >= 2 else None


def serves(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_tokens: int,
           num_kv_heads: int) -> bool:
    """Whether the kernel can take one decode token's attention (query [1, H, 128]) and the O
    projection `weight` [N, H x 128] (the attention itself: the caller asks cuda_decode.serves)."""
    if not (enabled_by_env() and query.is_cuda and num_tokens == 1 and bias is None):
        return False
    heads = query.shape[1]
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] != heads * 128:
        return False
    if not weight.is_contiguous() or weight.data_ptr() % 16 or splits_per_head(num_kv_heads) == 0:
        return False
    return plan(weight.shape[0], weight.shape[1], heads // num_kv_heads) is not None and _module() is not None


_clusters: dict[tuple, int] = {}  # launch shape -> clusters that fit at once (asked on the first launch)


def decode_o(query: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
             scale: float, weight: torch.Tensor, out: torch.Tensor | None, new_tokens: NewTokens | None = None,
             push: Exchange | None = None, stamps: torch.Tensor | None = None) -> torch.Tensor | None:
    """out [1, N] = weight @ attention(query [1, H, 128]) for one decode token (`serves` held);
    with `push` the rows go into the site's buffers instead (out None)."""
    module = _module()
    assert module is not None
    num_kv_heads = kv_cache.shape[3]
    splits = splits_per_head(num_kv_heads)
    n, k = weight.shape
    group = query.shape[1] // num_kv_heads
    rows, slots = plan(n, k, group)  # type: ignore[misc]
    ahead = int(os.environ.get(AHEAD_ENV_VAR, "") or 1)
    go = int(os.environ.get(GO_ENV_VAR, "") or 1)
    key = (query.device.index, group, num_kv_heads * splits, n, k, rows, slots)
    nt = new_tokens
    rope = nt is not None and nt.positions is not None
    clusters = module.decode_o(
        query, kv_cache[0], kv_cache[1], seq_lens, block_tables,
        nt.key if nt else None, nt.value if nt else None, nt.slot_mapping if nt else None,
        nt.positions if rope else None, nt.cos_cache if rope else None, nt.sin_cache if rope else None,
        scale * math.log2(math.e), weight, query if out is None else out,
        list(push.addresses) if push else [], push.epoch if push else None, push.rank if push else 0,
        push.world if push else 1, splits, _clusters.get(key, 0), rows, slots, ahead, go, True, stamps)
    _clusters[key] = clusters
    return out
