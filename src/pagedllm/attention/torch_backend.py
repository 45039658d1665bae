"""Reference paged attention in PyTorch: the CPU path and the oracle for GPU kernels.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, values). A request's tokens live in the blocks its block table lists, in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.metadata import AttentionMetadata


def write_to_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values [T, Hkv, D] at their flat slots (padding slots, -1, are skipped)."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
    num_tokens = slot_mapping.shape[0]
    if num_tokens and bool((slot_mapping < 0).any()):
        valid = slot_mapping >= 0
        key, value, slot_mapping = key[:num_tokens][valid], value[:num_tokens][valid], slot_mapping[valid]
    key_cache.index_copy_(0, slot_mapping, key[: slot_mapping.shape[0]].to(key_cache.dtype))
    value_cache.index_copy_(0, slot_mapping, value[: slot_mapping.shape[0]].to(value_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, Hkv, D] of one request, gathered from its blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks]
    keys = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len]
    values = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len]
    return keys, values


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of query tokens [T, H, D] over each request's cached keys/values.

    Decodes (one query token each) are batched into one padded computation; prefill chunks,
    whose earlier tokens may already be cached, run one request at a time.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    if out is None:
        out = torch.empty_like(query)
    nd = metadata.num_decodes
    if nd:
        out[:nd] = _decode_attention(query[:nd], kv_cache, metadata, scale)
    qsl = metadata.query_start_loc_cpu
    for i in range(nd, metadata.num_reqs):
        start, end = qsl[i], qsl[i + 1]
        seq_len = metadata.seq_lens_cpu[i]
        keys, values = gather_kv(kv_cache, metadata.block_tables[i], seq_len)
        q = query[start:end].transpose(0, 1)  # [H, q, D]
        k = keys.transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
        v = values.transpose(0, 1).to(q.dtype)
        query_len = end - start
        if query_len == seq_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        else:
            # Query j sits at position seq_len - query_len + j and sees keys up to it.
            mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - query_len)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        out[start:end] = o.transpose(0, 1)
    return out


def _decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Single-token queries [B, H, D] of the first B requests, batched over padded contexts."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    seq_lens = metadata.seq_lens[:batch]
    max_len = max(metadata.seq_lens_cpu[:batch])
    num_blocks = -(-max_len // block_size)
    blocks = metadata.block_tables[:batch, :num_blocks].flatten()
    # index_select on a flat block list is several times faster on CPU than 2-D advanced indexing.
    # [B * nb, bs, Hkv, D] -> [B, Hkv, L, D]
    shape = (batch, num_blocks * block_size, num_kv_heads, head_dim)
    keys = kv_cache[0].index_select(0, blocks).view(shape).transpose(1, 2).to(query.dtype)
    values = kv_cache[1].index_select(0, blocks).view(shape).transpose(1, 2).to(query.dtype)
    # The query heads of one KV head act as that head's "query sequence": GQA without copies.
    group = num_heads // num_kv_heads
    q = query.view(batch, num_kv_heads, group, head_dim)
    positions = torch.arange(keys.shape[2], device=query.device)
    mask = (positions[None, :] < seq_lens[:, None]).view(batch, 1, 1, -1)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return o.reshape(batch, num_heads, head_dim)
