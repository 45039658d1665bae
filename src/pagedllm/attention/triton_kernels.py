"""Triton kernels for the paged KV cache: slot writes, varlen paged attention, split-KV decode.

Launch them through `pagedllm.attention.triton_backend`, which picks tile sizes and grids.

Shared conventions:
- One layer's KV cache is [2, num_blocks, PAGE, num_kv_heads, head_dim]; the kernels get the key
  and value halves as two pointers with the same (block, token, head) strides; head_dim is
  contiguous. A KV token n of a request lives in block `block_table[n // PAGE]`, row `n % PAGE`.
  Block ids are read as int64, so offsets into a large pool do not overflow.
- Softmax runs in base 2: scores are multiplied by `scale * log2(e)` once and exp2 is used.
  Soft-capping (`cap * tanh(s / cap)`, Gemma 2) commutes with that factor: it is applied to the
  base-2 scores with `cap * log2(e)` as the cap.
- Sliding window (SLIDING): the query at position p sees keys p - window + 1 .. p, as in Hugging
  Face. Tiles wholly before a query tile's first visible key are skipped, and the tiles that hold
  keys some rows must not see load nothing below the tile's first visible key: blocks freed by
  the KV cache manager (out of every window) are never read.
- GQA: the query heads that share a KV head are stacked on the M dimension of tl.dot, so every
  KV tile is loaded once per KV head and serves the whole group.
- Nothing that changes from step to step (sequence lengths, number of requests, split length)
  is a constexpr: those come from tensors or plain int arguments excluded from specialization,
  so a captured CUDA graph and a new batch never force a recompilation.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit(do_not_specialize=["first_token"])
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, first_token,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
):
    """One program per token from first_token on: copy its [Hkv, D] key and value into its slot."""
    token = tl.program_id(0).to(tl.int64) + first_token
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token (CUDA-graph padding or a skipped row)
        return
    block = slot // PAGE
    row = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = block * stride_cb + row * stride_ct + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(x):
    """tanh from exp2 (no libdevice needed, so the interpreter runs it too); saturates cleanly."""
    return 1.0 - 2.0 / (1.0 + tl.exp2(x * 2.8853900817779268))  # 2 * log2(e)


@triton.jit
def _attend_kv_tile(
    acc, l_i, m_i, q, q_pos,
    key_cache_ptr, value_cache_ptr, block_table_ptr,
    start_n, kv_lo, kv_end, kv_head, scale_log2, window, softcap_log2,
    stride_cb, stride_ct, stride_ch,
    offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASK_END: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Fold KV tokens [start_n, start_n + BLOCK_N) into the online-softmax state (acc, l_i, m_i).

    MASK_END masks tokens at or past kv_end; MASK_CAUSAL also hides keys after each row's q_pos;
    MASK_WINDOW (always with MASK_END) neither loads tokens before kv_lo nor lets a row see keys
    at or before q_pos - window. Unmasked tiles skip every mask so their loads stay vectorized.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_END:
        n_valid = offs_n < kv_end
        if MASK_WINDOW:
            n_valid = n_valid & (offs_n >= kv_lo)
        # Past the last block the table may end (and before the window it may be stale): never read it there.
        block = tl.load(block_table_ptr + offs_n // PAGE, mask=n_valid, other=0).to(tl.int64)
    else:
        block = tl.load(block_table_ptr + offs_n // PAGE).to(tl.int64)
    kv_offs = block * stride_cb + (offs_n % PAGE) * stride_ct + kv_head * stride_ch
    ptrs = kv_offs[:, None] + offs_d[None, :]
    if MASK_END:
        kv_mask = n_valid[:, None]
        if BLOCK_D != HEAD_DIM:
            kv_mask = kv_mask & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(key_cache_ptr + ptrs, mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + ptrs, mask=kv_mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        d_mask = (offs_d < HEAD_DIM)[None, :]
        k = tl.load(key_cache_ptr + ptrs, mask=d_mask, other=0.0)
        v = tl.load(value_cache_ptr + ptrs, mask=d_mask, other=0.0)
    else:
        k = tl.load(key_cache_ptr + ptrs)
        v = tl.load(value_cache_ptr + ptrs)
    k = k.to(q.dtype)
    v = v.to(q.dtype)

    if DOT_UPCAST:  # the interpreter cannot multiply bf16 tiles: do it in fp32 there
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PREC)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s = s * scale_log2
    if SOFTCAP:
        s = softcap_log2 * _tanh(s / softcap_log2)
    if MASK_CAUSAL or MASK_WINDOW:
        visible = n_valid[None, :]
        if MASK_CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        if MASK_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    elif MASK_END:
        s = tl.where(n_valid[None, :], s, float("-inf"))

    # Without a window every row sees key 0 in its first tile, so m_new is finite and no
    # inf - inf appears (empty split-KV partitions never enter this function). A window tile
    # may hide every key from a row that has seen none yet: exp2 then uses 0 as the max.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = m_new
    if MASK_WINDOW:
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_UPCAST:
        pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PREC)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["first_req", "num_reqs", "window", "stride_bt"])
def _varlen_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    first_req, num_reqs, scale_log2, window, softcap_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Causal attention of a tile of BLOCK_Q query tokens x GROUP heads over one request's KV.

    Grid: (num_tokens // BLOCK_Q + num_reqs, num_kv_heads). Request i owns the tile indices
    starting at qsl[i] // BLOCK_Q + i: monotonic, at least cdiv(query_len, BLOCK_Q) apart, so
    a binary search finds the request and spare tiles simply exit. The grid depends only on
    the token and request counts, never on query lengths. Requests before `first_req` (decodes
    served by the decode kernel) are skipped by offsetting the per-request arrays here: sliced
    on the host, their addresses' alignment would vary with first_req and compile new variants.
    """
    query_start_loc_ptr += first_req
    seq_lens_ptr += first_req
    block_tables_ptr += first_req.to(tl.int64) * stride_bt
    # Highest tile first: a request's last query tiles see the most keys, so the long programs
    # start early and the short ones fill the tail.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    q_base = tl.load(query_start_loc_ptr)

    # Largest request whose first tile index is <= tile.
    lo = tl.full([], 0, tl.int32)
    hi = num_reqs + tl.full([], 0, tl.int32)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        first_tile = (tl.load(query_start_loc_ptr + mid) - q_base) // BLOCK_Q + mid
        starts_before = first_tile <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid)
    req = lo

    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile = tile - ((q_start - q_base) // BLOCK_Q + req)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    context_len = seq_len - q_len  # tokens cached before this step's chunk

    # Row r of the tile is token r // GROUP, query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    head = kv_head * GROUP + rows % GROUP
    q_pos = context_len + tok
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = row_valid[:, None]
    if BLOCK_D != HEAD_DIM:
        q_mask = q_mask & (offs_d < HEAD_DIM)[None, :]
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt

    # Keys before the tile's first query position are visible to every row: no masks there.
    first_pos = context_len + q_tile * BLOCK_Q
    last_tok = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = context_len + last_tok + 1
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    window_end = 0
    causal_start = full_end
    if SLIDING:
        # Keys from kv_lo on are seen by some row; those before kv_end - window are hidden from
        # the last row: the tiles up to window_end need the window mask (and all the others).
        kv_lo = tl.maximum(first_pos - window + 1, 0)
        window_end = tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N
        causal_start = tl.maximum(full_end, window_end)
        for start_n in range(kv_lo // BLOCK_N * BLOCK_N, window_end, BLOCK_N):
            acc, l_i, m_i = _attend_kv_tile(
                acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
                start_n, kv_lo, kv_end, kv_head, scale_log2, window, softcap_log2,
                stride_cb, stride_ct, stride_ch, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, True, True, SOFTCAP, DOT_PREC, DOT_UPCAST)
    for start_n in range(window_end, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start_n, 0, kv_end, kv_head, scale_log2, window, softcap_log2,
            stride_cb, stride_ct, stride_ch, offs_d,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, False, False, SOFTCAP, DOT_PREC, DOT_UPCAST)
    for start_n in range(causal_start, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start_n, 0, kv_end, kv_head, scale_log2, window, softcap_log2,
            stride_cb, stride_ct, stride_ch, offs_d,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, True, False, SOFTCAP, DOT_PREC, DOT_UPCAST)

    if SLIDING:  # rows past the chunk's last token may see no key in the window: no 0 / 0
        l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _rope(x, x_partner, cos, sin, lower):
    """NeoX rotary of a loaded vector/tile whose last dim is the head dim: x_partner holds each
    element's rotate-half partner (d +- D/2), `lower` marks the first half. The same fp32
    expressions as `triton_fused._rotate_heads`, rounded back to x's dtype."""
    xf, pf = x.to(tl.float32), x_partner.to(tl.float32)
    return tl.where(lower, xf * cos - pf * sin, xf * cos + pf * sin).to(x.dtype)


@triton.jit(do_not_specialize=["num_splits", "window", "stride_bt"])
def _decode_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_splits, scale_log2, window, softcap_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt,
    new_k_ptr, new_v_ptr, slot_mapping_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_nkt, stride_nkh, stride_nvt, stride_nvh, stride_cos,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    SPLIT: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, PART_N: tl.constexpr,
    WRITE_KV: tl.constexpr = False, ROPE: tl.constexpr = False,
    PDL_TRIGGER: tl.constexpr = False, PDL_WAIT: tl.constexpr = False,
):
    """One query token's GROUP heads over one partition of its request's KV (flash-decoding).

    Grid: (num_decodes, num_kv_heads, num_splits). The partition length is derived from the
    request's seq_len in the kernel (a multiple of PART_N, usually BLOCK_N), so the split count
    may stay fixed while lengths change. A partition shorter than the tile is one masked tile:
    a short context spreads over more programs without a smaller tile for long ones. (With
    SLIDING, PART_N must be BLOCK_N: the window's tiles align with the partitions.) With SPLIT
    the normalized partial output and its log2-sum-exp go to fp32 scratch for
    `_reduce_splits_kernel`; without it the output is written directly. With SLIDING only the
    keys from seq_len - window on are partitioned.

    Folded steps (each replaces a kernel launch of the unfused path, same arithmetic):
    - WRITE_KV: the program whose partition holds the newest key (position seq_len - 1) first
      writes this step's key/value (new_k/new_v [T, Hkv, D], slot_mapping [T]; slot -1 writes
      nothing) into the cache, as `_reshape_and_cache_kernel` would, then reads it back.
    - ROPE (with WRITE_KV): the query and that key are rotated (NeoX, full head dim) at
      positions[token] with cos/sin rows [.., HEAD_DIM] (each frequency twice), as the rotary
      kernel would; the query is rotated in registers, its buffer is left as it was.
    (Folding the split reduce in too, the last program of each KV head combining the partials
    after an arrival counter, was measured slower than the reduce kernel: 3-4 us per layer on
    an H200, the gpu-scope atomics and the serial combine on the critical path.)
    Programmatic dependent launch (triton_backend.attention_pdl): PDL_TRIGGER lets a PDL-launched
    successor start now; PDL_WAIT (the kernel itself launched with PDL) waits for its
    predecessor before anything is read.
    """
    if PDL_TRIGGER:
        gdc_launch_dependents()
    if PDL_WAIT:
        gdc_wait()
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    kv_lo = 0  # first visible key
    window_end = 0  # tiles before it hold keys before kv_lo
    if SLIDING:
        kv_lo = tl.maximum(seq_len - window, 0)
        window_end = tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N
    first_tile = kv_lo // BLOCK_N * BLOCK_N
    part_len = tl.cdiv(tl.cdiv(seq_len - first_tile, num_splits), PART_N) * PART_N
    kv_start = first_tile + split * part_len
    kv_end = tl.minimum(kv_start + part_len, seq_len)

    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP
    head = kv_head * GROUP + rows
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = row_valid[:, None]
    if BLOCK_D != HEAD_DIM:
        q_mask = q_mask & (offs_d < HEAD_DIM)[None, :]
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    q_ptrs = q_ptr + token * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    if ROPE:
        lower = offs_d < HEAD_DIM // 2
        partner = tl.where(lower, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        pos = tl.load(positions_ptr + token).to(tl.int64)
        d_ok = offs_d < HEAD_DIM
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        q = _rope(q, tl.load(q_ptrs + partner[None, :], mask=q_mask, other=0.0), cos[None, :], sin[None, :],
                  lower[None, :])
    if WRITE_KV:
        newest = seq_len - 1
        if (kv_start <= newest) & (newest < kv_end):
            slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
            if slot >= 0:
                d_ok = offs_d < HEAD_DIM
                k_ptrs = new_k_ptr + token * stride_nkt + kv_head * stride_nkh
                k_new = tl.load(k_ptrs + offs_d, mask=d_ok, other=0.0)
                if ROPE:
                    k_new = _rope(k_new, tl.load(k_ptrs + partner, mask=d_ok, other=0.0), cos, sin, lower)
                v_new = tl.load(new_v_ptr + token * stride_nvt + kv_head * stride_nvh + offs_d, mask=d_ok)
                dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ct + kv_head * stride_ch + offs_d
                tl.store(key_cache_ptr + dst, k_new.to(key_cache_ptr.dtype.element_ty), mask=d_ok)
                tl.store(value_cache_ptr + dst, v_new.to(value_cache_ptr.dtype.element_ty), mask=d_ok)
            # Every thread's stores land before any thread loads the tile that holds them.
            tl.debug_barrier()

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    # The decode query is the newest token: it sees every cached key (in its window), so only
    # the end (and the window's first tile) is masked.
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + seq_len - 1
    body_start = kv_start
    if SLIDING:
        body_start = tl.maximum(kv_start, window_end)
        for start_n in range(kv_start, tl.minimum(window_end, kv_end), BLOCK_N):
            acc, l_i, m_i = _attend_kv_tile(
                acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
                start_n, kv_lo, kv_end, kv_head, scale_log2, window, softcap_log2,
                stride_cb, stride_ct, stride_ch, offs_d,
                HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, False, True, SOFTCAP, DOT_PREC, DOT_UPCAST)
    full_end = body_start + tl.maximum(kv_end - body_start, 0) // BLOCK_N * BLOCK_N
    for start_n in range(body_start, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start_n, 0, kv_end, kv_head, scale_log2, window, softcap_log2,
            stride_cb, stride_ct, stride_ch, offs_d,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, False, False, SOFTCAP, DOT_PREC, DOT_UPCAST)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start_n, 0, kv_end, kv_head, scale_log2, window, softcap_log2,
            stride_cb, stride_ct, stride_ch, offs_d,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, False, False, SOFTCAP, DOT_PREC, DOT_UPCAST)

    # An empty partition (short sequence, or a seq_len-0 padding request) has l_i == 0:
    # it yields zeros and a -inf weight instead of 0/0.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if SPLIT:
        part = (req * NUM_HEADS + head).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=q_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_valid)
    else:
        tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_loc_ptr,
    num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL_TRIGGER: tl.constexpr = False, PDL_WAIT: tl.constexpr = False,
):
    """Combine the partial outputs of one (request, head) weighted by exp2(lse - max lse).
    PDL_TRIGGER / PDL_WAIT: as in _decode_attention_kernel."""
    if PDL_TRIGGER:
        gdc_launch_dependents()
    if PDL_WAIT:
        gdc_wait()
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    base = (req * NUM_HEADS + head).to(tl.int64) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # Empty partitions (lse = -inf) weigh exp2(-inf) = 0; when all are empty (seq_len 0)
    # a finite stand-in max keeps -inf - -inf (NaN) out.
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)
    weight = tl.exp2(lse - lse_max)
    total = tl.sum(weight, axis=0)
    mask = s_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    parts = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
