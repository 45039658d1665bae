"""Reference paged attention in PyTorch: the CPU path and the oracle for GPU kernels.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, values). A request's tokens live in the blocks its block table lists, in order.

Sliding window (Hugging Face's semantics): with `sliding_window=W`, the query at position p
sees the keys at positions p - W + 1 .. p (W keys, itself included). Only the blocks holding
such keys are gathered, so blocks the KV cache manager freed (entirely before every window)
are never read, whatever their block-table entries now point to.
Logit soft-capping (Gemma 2): scores become `cap * tanh(scores / cap)` before the mask.
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


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, first_block: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len - first_block * block_size, Hkv, D] of one request, from its blocks.

    The gather starts at block `first_block` (blocks before it lie outside a sliding window).
    """
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[first_block:num_blocks]
    num_keys = seq_len - first_block * block_size
    keys = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:num_keys]
    values = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:num_keys]
    return keys, values


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v over [..., Hq, Lq, D] x [..., Hkv, Lk, D].

    SDPA where it can; soft-capping acts on the raw scores, which SDPA never exposes, so that
    case is computed explicitly (as Hugging Face's eager attention does).
    """
    num_heads, num_kv_heads = q.shape[-3], k.shape[-3]
    if logits_soft_cap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=num_heads != num_kv_heads)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=num_heads != num_kv_heads)
    if num_heads != num_kv_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=-3)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of query tokens [T, H, D] over each request's cached keys/values.

    Decodes (one query token each) are batched into one padded computation; prefill chunks,
    whose earlier tokens may already be cached, run one request at a time. `sliding_window`
    limits each query to its last W keys; `logits_soft_cap` caps the scores (see module doc).
    """
    if out is None:
        out = torch.empty_like(query)
    nd = metadata.num_decodes
    if nd:
        out[:nd] = _decode_attention(query[:nd], kv_cache, metadata, scale, sliding_window, logits_soft_cap)
    block_size = kv_cache.shape[2]
    qsl = metadata.query_start_loc_cpu
    for i in range(nd, metadata.num_reqs):
        start, end = qsl[i], qsl[i + 1]
        seq_len = metadata.seq_lens_cpu[i]
        query_len = end - start
        context_len = seq_len - query_len
        # The first query (position context_len) sees nothing before context_len - W + 1.
        first_block = 0 if sliding_window is None else max(0, context_len - sliding_window + 1) // block_size
        keys, values = gather_kv(kv_cache, metadata.block_tables[i], seq_len, first_block)
        q = query[start:end].transpose(0, 1)  # [H, q, D]
        k = keys.transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
        v = values.transpose(0, 1).to(q.dtype)
        mask = None  # plain causal attention over the whole sequence
        if query_len != seq_len or sliding_window is not None:
            # Query j sits at position context_len + j and sees keys up to it (and within the window).
            q_pos = torch.arange(context_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(first_block * block_size, seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        out[start:end] = _attend(q, k, v, mask, scale, logits_soft_cap).transpose(0, 1)
    return out


def _decode_plan(
    metadata: AttentionMetadata, batch: int, block_size: int, sliding_window: int | None, device: torch.device,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Which cache blocks the first `batch` (decode) requests gather, flattened [B * nb], the
    blocks per request nb, and which gathered keys each request sees [B, 1, 1, nb * block_size].

    The same for every layer of a step with this window: computed once per step (each layer
    would otherwise spend as long on it as on its attention at batch 1 on a CPU).
    """
    key = ("torch_decode_plan", batch, block_size, sliding_window)
    plan = metadata.backend_cache.get(key)
    if plan is not None:
        return plan
    seq_lens = metadata.seq_lens[:batch]
    # Each request gathers its blocks from the first one holding a key it sees (with a window,
    # that of position seq_len - W); shorter requests pad by repeating their own last block,
    # masked below, so no other request's (or freed) block is ever read.
    window = sliding_window if sliding_window is not None else max(metadata.seq_lens_cpu[:batch])
    num_blocks = max(-(-n // block_size) - max(0, n - window) // block_size for n in metadata.seq_lens_cpu[:batch])
    first_block = (seq_lens - window).clamp(min=0) // block_size
    last_block = ((seq_lens - 1) // block_size).clamp(min=0)
    columns = first_block[:, None] + torch.arange(num_blocks, device=device)[None, :]
    blocks = metadata.block_tables[:batch].gather(1, torch.minimum(columns, last_block[:, None]))
    positions = first_block[:, None] * block_size + torch.arange(num_blocks * block_size, device=device)[None, :]
    mask = (positions < seq_lens[:, None]) & (positions >= (seq_lens - window)[:, None])
    plan = (blocks.flatten(), num_blocks, mask.view(batch, 1, 1, -1))
    metadata.backend_cache[key] = plan
    return plan


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Single-token queries [B, H, D] of the first B requests, batched over padded contexts."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    blocks, num_blocks, mask = _decode_plan(metadata, batch, block_size, sliding_window, query.device)
    # index_select on a flat block list is several times faster on CPU than 2-D advanced indexing.
    # [B * nb, bs, Hkv, D] -> [B, Hkv, L, D]
    shape = (batch, num_blocks * block_size, num_kv_heads, head_dim)
    keys = kv_cache[0].index_select(0, blocks).view(shape).transpose(1, 2).to(query.dtype)
    values = kv_cache[1].index_select(0, blocks).view(shape).transpose(1, 2).to(query.dtype)
    # The query heads of one KV head act as that head's "query sequence": GQA without copies.
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = _attend(q, keys, values, mask, scale, logits_soft_cap)
    return o.reshape(batch, num_heads, head_dim)
