"""Triton paged attention: the CUDA path, with the same contract as `torch_backend`.

`reshape_and_cache` writes a step's new keys/values into their slots; `paged_attention` runs
one mixed batch: the decodes (first `num_decodes` requests, one token each) through the split-KV
decode kernel (or, for small batches on sm_90+, the CUDA kernel of `cuda_decode`), the prefill
chunks through the varlen kernel. The kernels live in
`triton_kernels.py`; this module checks inputs, picks tiles and grids, and launches them.

Under `TRITON_INTERPRET=1` the same code runs on CPU tensors (the CI tests).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from pagedllm.attention import cuda_decode
from pagedllm.attention import triton_kernels as kernels
from pagedllm.attention.metadata import AttentionMetadata

LOG2_E = 1.4426950408889634
# Split-KV heuristic, fitted on an H200 (benchmarks/bench_attention_gpu.py --sweep full): the
# decode kernel streams KV best with about two programs per SM; more programs only add partial
# writes and shorter pipelines. Partitions shorter than _MIN_PARTITION_TOKENS are not worth it.
_TARGET_PROGRAMS_PER_SM = 2
_MIN_PARTITION_TOKENS = 128
MAX_KV_SPLITS = 64
# Decode partitions in multiples of this many tokens instead of the KV tile's (None): see
# _decode_attention_kernel. Unmeasured in the engine, so off; benchmarks set it.
DECODE_PARTITION_TOKENS: int | None = None


@dataclass(frozen=True)
class NewTokens:
    """This step's keys/values, for the decode kernel to write into the cache itself.

    key / value [T, Hkv, D] (views of a fused QKV output are fine: the last dim must be
    contiguous), slot_mapping [T] (-1: write nothing). With positions [T] and the rotary
    cos/sin tables [max_position, D] (each frequency twice, NeoX layout, full head dim), the
    decodes' queries and keys are rotated in the kernel too. Only the decode tokens (the first
    num_decodes) are handled: a mixed batch's prefill tokens must be rotated and written before
    (`reshape_and_cache(..., first_token=num_decodes)`). Replaces the rotary and
    reshape-and-cache launches of a decode-only step with nothing (see `_decode_attention_kernel`).
    """

    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor | None = None
    cos_cache: torch.Tensor | None = None
    sin_cache: torch.Tensor | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


ATTENTION_PDL_ENV = "PAGEDLLM_ATTENTION_PDL"


@functools.cache
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def attention_pdl(device: torch.device, cuda_kernel: bool = False) -> int:
    """How the decode attention takes part in programmatic dependent launch (sm_90+, not
    interpreting; PAGEDLLM_ATTENTION_PDL): 0 not at all; 1 the kernel that writes the output (the
    split reduce, or the decode kernel unsplit, or the CUDA decode kernel) lets a PDL-launched
    successor (the CUDA GEMV of the O projection) start as it starts; 2 as 1, and the decode
    kernel and the split reduce are themselves launched with PDL, each letting its successor
    start at once and waiting for its predecessor before reading anything.

    Default: 1, except 2 for the Triton kernels on one GPU (`cuda_kernel`: the CUDA decode kernel
    of cuda_decode.py serves the step). L1 on 2 x H200 (docs/benchmarks.md): with the Triton
    kernels mode 1 took 35-38 us off a step at either size, and mode 2 14-22 us more at TP=1 in
    three calls but gave back mode 1's gain at TP=2 (sixteenth session); with the CUDA kernel
    mode 2 cost 37 us a step at TP=1 and 67 at TP=2 (eighteenth session)."""
    if device.type != "cuda" or _interpreting():
        return 0
    from pagedllm.distributed import get_tp_size

    default = 2 if get_tp_size() == 1 and not cuda_kernel else 1
    mode = int(os.environ.get(ATTENTION_PDL_ENV, "") or default)
    if mode <= 0 or _capability_major(device.index if device.index is not None else torch.cuda.current_device()) < 9:
        return 0
    return min(mode, 2)


def _dot_args(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision, upcast) for tl.dot: exact fp32 for fp32 inputs (no TF32 rounding);
    under the interpreter, bf16 tiles are multiplied in fp32 because numpy lacks bf16."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return precision, _interpreting() and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device, cpu_default: int = 8) -> int:
    """Streaming multiprocessors of `device` (`cpu_default` on CPU, where only the interpreter runs)."""
    if device.type != "cuda":
        return cpu_default
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sm_count: int) -> int:
    """How many partitions each decode's KV is split into (a power of two, 1 = no split).

    Without splitting, the decode grid has num_seqs x num_kv_heads programs; when that leaves
    SMs idle (few or single long sequences) we split up to about _TARGET_PROGRAMS_PER_SM
    programs per SM, but never into partitions shorter than _MIN_PARTITION_TOKENS.
    For CUDA graphs, call it with max_model_len so one count serves every replay.
    """
    programs = max(1, num_seqs * num_kv_heads)
    wanted = _TARGET_PROGRAMS_PER_SM * sm_count // programs
    by_length = max(1, max_seq_len // _MIN_PARTITION_TOKENS)
    splits = max(1, min(wanted, by_length, MAX_KV_SPLITS))
    return 1 << (splits.bit_length() - 1)  # round down to a power of two: few compiled variants


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    first_token: int = 0,
) -> None:
    """Store new keys/values [T, Hkv, D] at their flat slots; padding slots (-1) are skipped.

    Tokens [first_token, slot_mapping.shape[0]) are written (an offset, not a slice: the tensors
    keep their alignment and the kernel its compiled variant); values are cast to the cache dtype.
    """
    num_tokens = slot_mapping.shape[0] - first_token
    if num_tokens <= 0:
        return
    _check_kv_cache(kv_cache)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _, _, page, num_kv_heads, head_dim = kv_cache.shape
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    kernels._reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping, first_token,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=page,
    )


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_kv_splits: int | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    new_tokens: NewTokens | None = None,
) -> torch.Tensor:
    """Causal attention of query tokens [T, H, D] over each request's cached keys/values.

    Same contract as `torch_backend.paged_attention` (sliding window and soft-capping included):
    rows past metadata's last request are left untouched. `num_kv_splits` fixes the decode
    split count (None: `choose_num_kv_splits`). `new_tokens`: the decodes' keys/values of this
    step, written (and rotated) by the decode kernel instead of beforehand (see NewTokens).
    """
    if out is None:
        out = torch.empty_like(query)
    num_decodes = metadata.num_decodes
    num_reqs = metadata.num_reqs
    qsl = metadata.query_start_loc_cpu
    if num_decodes:
        if cuda_decode.serves(query, kv_cache, out, metadata.seq_lens, metadata.block_tables, num_decodes,
                              metadata.max_seq_len, sliding_window, logits_soft_cap, new_tokens):
            _check_inputs(query, kv_cache, out, metadata.block_tables)
            _new_tokens_args(new_tokens, query, kv_cache.shape[3], query.shape[2], num_decodes)  # validates
            cuda_decode.decode_attention(query, kv_cache, metadata.seq_lens, metadata.block_tables, num_decodes,
                                         scale, out, new_tokens, attention_pdl(query.device, cuda_kernel=True))
        else:
            if num_kv_splits is None:
                max_decode_len = max(metadata.seq_lens_cpu[:num_decodes])
                if sliding_window is not None:
                    max_decode_len = min(max_decode_len, sliding_window)  # keys a decode actually reads
                num_kv_splits = choose_num_kv_splits(num_decodes, kv_cache.shape[3], max_decode_len,
                                                     num_sms(query.device))
            decode_attention(query, kv_cache, metadata.query_start_loc, metadata.seq_lens,
                             metadata.block_tables, num_decodes, scale, out, num_kv_splits=num_kv_splits,
                             sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                             new_tokens=new_tokens)
    if num_reqs > num_decodes:
        varlen_attention(query, kv_cache, metadata.query_start_loc, metadata.seq_lens,
                         metadata.block_tables, num_decodes, num_reqs, qsl[num_reqs] - qsl[num_decodes],
                         scale, out, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    return out


def _window_args(sliding_window: int | None, logits_soft_cap: float | None) -> dict[str, object]:
    """Kernel arguments for the optional sliding window and soft cap (scores are in base 2)."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if logits_soft_cap is not None and logits_soft_cap <= 0:
        raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap}")
    return dict(window=sliding_window or 0, softcap_log2=(logits_soft_cap or 1.0) * LOG2_E,
                SLIDING=sliding_window is not None, SOFTCAP=logits_soft_cap is not None)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    num_decodes: int,
    scale: float,
    out: torch.Tensor,
    *,
    num_kv_splits: int = 1,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    new_tokens: NewTokens | None = None,
    partition_tokens: int | None = None,
) -> torch.Tensor:
    """Single-token attention for requests [0, num_decodes), each KV split into partitions.

    With a sliding window only the last `sliding_window` keys are partitioned. `new_tokens`:
    the kernel writes (and rotates) this step's keys/values itself (see NewTokens). Tile
    overrides (block_n, num_warps, num_stages) exist for tests and benchmarks, and so does
    `partition_tokens` (default DECODE_PARTITION_TOKENS; None: partitions in whole tiles).
    """
    _check_inputs(query, kv_cache, out, block_tables)
    _, num_heads, head_dim = query.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be at least 1, got {num_kv_splits}")
    partition_tokens = partition_tokens or DECODE_PARTITION_TOKENS
    if partition_tokens is not None and partition_tokens < 1:
        raise ValueError(f"partition_tokens must be at least 1, got {partition_tokens}")
    new_kv_args = _new_tokens_args(new_tokens, query, num_kv_heads, head_dim, num_decodes)
    # Few resident programs per SM each need more bytes in flight: larger KV tiles then
    # (H200 sweep: 128-token tiles win up to ~2 programs per SM, 64-token tiles beyond;
    # 32 KB tiles prefer 2 pipeline stages, smaller ones 3).
    few_programs = num_decodes * num_kv_heads * num_kv_splits <= _TARGET_PROGRAMS_PER_SM * num_sms(query.device)
    block_n = block_n or min(128, max(16, (16384 if few_programs else 8192) // triton.next_power_of_2(head_dim)))
    num_warps = num_warps or 4
    num_stages = num_stages or (2 if block_n * head_dim >= 16384 else 3)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    split = num_kv_splits > 1
    if split:
        part_out = torch.empty(num_decodes, num_heads, num_kv_splits, head_dim,
                               dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_decodes, num_heads, num_kv_splits, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused by the kernel when SPLIT is off
    precision, upcast = _dot_args(query.dtype)
    block_d = triton.next_power_of_2(head_dim)
    pdl = attention_pdl(query.device)
    pdl_args = dict(launch_pdl=True) if pdl >= 2 else {}
    kernels._decode_attention_kernel[(num_decodes, num_kv_heads, num_kv_splits)](
        query, key_cache, value_cache, out, part_out, part_lse,
        query_start_loc, seq_lens, block_tables,
        num_splits=num_kv_splits, scale_log2=scale * LOG2_E,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_cb=key_cache.stride(0), stride_ct=key_cache.stride(1), stride_ch=key_cache.stride(2),
        stride_bt=block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group,
        # tl.dot needs M >= 16: small groups leave rows idle, which costs no extra KV reads.
        BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page,
        SPLIT=split, DOT_PREC=precision, DOT_UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
        PDL_TRIGGER=pdl >= 2 or (pdl == 1 and not split), PDL_WAIT=pdl >= 2,
        PART_N=block_n if partition_tokens is None or sliding_window is not None else partition_tokens,
        **pdl_args,
        **_window_args(sliding_window, logits_soft_cap), **new_kv_args,
    )
    if split:
        kernels._reduce_splits_kernel[(num_decodes, num_heads)](
            part_out, part_lse, out, query_start_loc,
            num_kv_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_kv_splits),
            PDL_TRIGGER=pdl >= 1, PDL_WAIT=pdl >= 2, num_warps=4, **pdl_args,
        )
    return out


def _new_tokens_args(new_tokens: NewTokens | None, query: torch.Tensor, num_kv_heads: int, head_dim: int,
                     num_decodes: int) -> dict[str, object]:
    """The decode kernel's arguments for the K/V write and rotary folded into it (off: dummies)."""
    if new_tokens is None:
        return dict(new_k_ptr=query, new_v_ptr=query, slot_mapping_ptr=query, positions_ptr=query,
                    cos_ptr=query, sin_ptr=query, stride_nkt=0, stride_nkh=0, stride_nvt=0, stride_nvh=0,
                    stride_cos=0, WRITE_KV=False, ROPE=False)
    key, value = new_tokens.key, new_tokens.value
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or t.shape[1:] != (num_kv_heads, head_dim) or t.shape[0] < num_decodes or t.stride(-1) != 1:
            raise ValueError(f"new_tokens.{name} must be [T >= {num_decodes}, {num_kv_heads}, {head_dim}] with a "
                             f"contiguous last dim, got {tuple(t.shape)} strides {t.stride()}")
    if new_tokens.slot_mapping.shape[0] < num_decodes:
        raise ValueError("new_tokens.slot_mapping has fewer entries than decodes")
    rope = new_tokens.positions is not None
    cos, sin = new_tokens.cos_cache, new_tokens.sin_cache
    if rope:
        if cos is None or sin is None:
            raise ValueError("new_tokens.positions needs cos_cache and sin_cache")
        if (cos.dim() != 2 or cos.shape[1] != head_dim or cos.stride(-1) != 1 or cos.stride() != sin.stride()
                or head_dim % 2):
            raise ValueError(f"the fused rotary needs cos/sin tables [max_position, {head_dim}] (full, even head "
                             f"dim) with a contiguous last dim, got {tuple(cos.shape)}")
    return dict(new_k_ptr=key, new_v_ptr=value, slot_mapping_ptr=new_tokens.slot_mapping,
                positions_ptr=new_tokens.positions if rope else query,
                cos_ptr=cos if rope else query, sin_ptr=sin if rope else query,
                stride_nkt=key.stride(0), stride_nkh=key.stride(1), stride_nvt=value.stride(0),
                stride_nvh=value.stride(1), stride_cos=cos.stride(0) if rope else 0,
                WRITE_KV=True, ROPE=rope)


def varlen_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    first_req: int,
    num_reqs: int,
    num_tokens: int,
    scale: float,
    out: torch.Tensor,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention for requests [first_req, num_reqs) of any query length (decodes too).

    num_tokens is the query tokens of those requests together (sizes the grid); tile
    overrides exist for tests and benchmarks.
    """
    _check_inputs(query, kv_cache, out, block_tables)
    _, num_heads, head_dim = query.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    # H200 sweep, 4 x 2048 causal bf16 at head_dim 128: (128, 64, 4 warps, 3 stages) 289 TFLOP/s,
    # (128, 64, 8, 2) 244; head_dim 256 halves the tiles to stay within shared memory.
    default_m, default_n, default_stages = (64, 32, 2) if head_dim > 128 else (128, 64, 3)
    block_m = max(block_m or default_m, 16, triton.next_power_of_2(group))
    block_n = block_n or default_n
    num_warps = num_warps or 4
    num_stages = num_stages or default_stages
    block_q = block_m // group
    n_reqs = num_reqs - first_req
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    precision, upcast = _dot_args(query.dtype)
    grid = (num_tokens // block_q + n_reqs, num_kv_heads)
    kernels._varlen_attention_kernel[grid](
        query, key_cache, value_cache, out,
        query_start_loc, seq_lens, block_tables,
        first_req=first_req, num_reqs=n_reqs, scale_log2=scale * LOG2_E,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_cb=key_cache.stride(0), stride_ct=key_cache.stride(1), stride_ch=key_cache.stride(2),
        stride_bt=block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), PAGE=page,
        DOT_PREC=precision, DOT_UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
        **_window_args(sliding_window, logits_soft_cap),
    )
    return out


def _check_kv_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be contiguous in head_dim")
    page = kv_cache.shape[2]
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two for the Triton backend, got {page}")


def _check_inputs(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor) -> None:
    _check_kv_cache(kv_cache)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"query head_dim {head_dim} does not match the cache's {kv_cache.shape[4]}")
    if query.stride(-1) != 1 or out.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("query, out and block_tables must be contiguous in their last dimension")
