"""One-pass Triton sampling of temperature-only random rows (the Gumbel-max trick).

Row r of `logits` gets the token argmax_i (logit_i / T_r + G_i) with Gumbel noise
G_i = -log(E_i), E_i = -log(U_i) ~ Exp(1), U_i = tl.rand(seed, r * V + i) (Philox). This is the
sampler's exponential race (argmax P_i / E_i with P = exp(logit / T)) in log space: token i is
drawn with probability softmax(logits / T)_i, and no row max, exp or normalisation is needed, so
each logit is read once and nothing is written but a few bytes per program.

The PyTorch path takes ~10 full passes over the [rows, vocab] fp32 logits (amax, sub, div, exp,
uniform_, log, div, argmax, gather) and host syncs; this is two launches and no sync:

1. `_race_partial_kernel`, grid (row blocks, vocabulary chunks): a program races its chunk of
   8192 tokens (tiles of 1024) and writes its winner (key, token) plus a second winner among
   the +inf logits, keyed by noise alone. 256 rows x 151,936 tokens make 256 x 19 programs.
   Small vocabularies put several rows in one tile instead.
2. `_race_reduce_kernel`: per row, the best of those partials.

Bad values follow `sanitized()` in sampler.py: NaN counts as -inf; a row holding +inf draws
uniformly among its +inf entries; a row with nothing finite returns token 0. U == 0 (probability
2**-31 per token) makes G = -inf: such a key is raised to -FLT_MAX so a finite logit still beats
a -inf or NaN one. Ties go to the lowest token id, as torch.argmax.

Integers that change between calls (seed, row count, strides) are `do_not_specialize`: Triton
would otherwise specialise ints equal to 1 or divisible by 16 and recompile for a new seed or
batch size. Tile shapes depend on the vocabulary size only. Under TRITON_INTERPRET=1 the kernels
run on CPU tensors (the tests). The seed is a kernel argument: do not capture these launches in
a CUDA graph, whose replays would reuse the captured seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per tile (lanes of one program: 4 per thread with 8 warps).
_BLOCK = 1024
# Tiles per program: a chunk of 8192 tokens amortises the per-program reductions while
# 151,936 tokens still split into 19 chunks per row (thousands of programs at batch 256).
_TILES_PER_CHUNK = 8
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32


@triton.jit
def _race_keys(x, u, temperature):
    """(key, inf_key) of logits x [fp32] with uniforms u and per-row temperature [ROWS, 1].

    key = x / T + G over finite x (-inf elsewhere, so NaN / -inf never win); inf_key = G over
    +inf entries (-inf elsewhere). Both are at least -FLT_MAX where they count: U == 0 gives
    G = -inf, which must still beat an entry that does not count.
    """
    gumbel = -tl.log(-tl.log(u))
    finite = (x > float("-inf")) & (x < float("inf"))  # false for NaN
    # tl.maximum is maxnum (NaN -> the other operand): the one NaN sum, x / T overflowing to
    # +inf with G = -inf, also lands on -FLT_MAX.
    key = tl.where(finite, tl.maximum(x / temperature + gumbel, -_FLT_MAX), float("-inf"))
    inf_key = tl.where(x == float("inf"), tl.maximum(gumbel, -_FLT_MAX), float("-inf"))
    return key, inf_key


@triton.jit
def _first_argmax(keys, ids, axis: tl.constexpr):
    """(max of keys, smallest id holding it) along `axis`: torch.argmax's first-index rule."""
    best = tl.max(keys, axis=axis)
    best_id = tl.min(tl.where(keys == tl.expand_dims(best, axis), ids, 2147483647), axis=axis)
    return best, best_id


@triton.jit(do_not_specialize=["seed", "n_rows", "vocab_size", "stride_row", "n_chunks"])
def _race_partial_kernel(
    logits_ptr, temperature_ptr, rows_ptr,
    keys_ptr, ids_ptr, inf_keys_ptr, inf_ids_ptr,
    seed, n_rows, vocab_size, stride_row, n_chunks,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    """Program (row block, chunk): the winners of ROWS rows over TILES * BLOCK tokens."""
    out_rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    chunk = tl.program_id(1)
    row_ok = out_rows < n_rows
    # Output row j samples logits row rows[j] (or j); its noise depends on j only.
    if HAS_ROWS:
        src_rows = tl.load(rows_ptr + out_rows, mask=row_ok, other=0)
    else:
        src_rows = out_rows
    temperature = tl.load(temperature_ptr + src_rows, mask=row_ok, other=1.0).to(tl.float32)[:, None]
    row_ptrs = logits_ptr + (src_rows * stride_row)[:, None]
    noise_base = (out_rows * vocab_size)[:, None]  # int64: no wrap past 2**31 elements
    lanes = chunk * (TILES * BLOCK) + tl.arange(0, BLOCK)
    # Per-lane running winners; one cross-lane reduction at the end instead of one per tile.
    best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
    best_id = tl.zeros((ROWS, BLOCK), tl.int32)
    inf_best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
    inf_id = tl.zeros((ROWS, BLOCK), tl.int32)
    for t in range(TILES):
        cols = (lanes + t * BLOCK)[None, :]
        mask = row_ok[:, None] & (cols < vocab_size)
        x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, noise_base + cols)
        key, inf_key = _race_keys(x, u, temperature)
        # Strict ">": a lane sees its tokens in increasing order, so ties keep the first.
        better = key > best
        best = tl.where(better, key, best)
        best_id = tl.where(better, cols, best_id)
        better = inf_key > inf_best
        inf_best = tl.where(better, inf_key, inf_best)
        inf_id = tl.where(better, cols, inf_id)
    chunk_best, chunk_id = _first_argmax(best, best_id, 1)
    chunk_inf, chunk_inf_id = _first_argmax(inf_best, inf_id, 1)
    offs = out_rows * n_chunks + chunk
    tl.store(keys_ptr + offs, chunk_best, mask=row_ok)
    tl.store(ids_ptr + offs, chunk_id, mask=row_ok)
    tl.store(inf_keys_ptr + offs, chunk_inf, mask=row_ok)
    tl.store(inf_ids_ptr + offs, chunk_inf_id, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "n_chunks"])
def _race_reduce_kernel(
    keys_ptr, ids_ptr, inf_keys_ptr, inf_ids_ptr, out_ptr,
    n_rows, n_chunks,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program: ROWS rows' token = the +inf winner if any, else the finite winner, else 0."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    chunks = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (chunks < n_chunks)[None, :]
    offs = rows[:, None] * n_chunks + chunks[None, :]
    keys = tl.load(keys_ptr + offs, mask=mask, other=float("-inf"))
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    inf_keys = tl.load(inf_keys_ptr + offs, mask=mask, other=float("-inf"))
    inf_ids = tl.load(inf_ids_ptr + offs, mask=mask, other=0)
    # Chunks hold increasing token ranges: the smallest id among tied chunks is the first token.
    best, best_id = _first_argmax(keys, ids, 1)
    inf_best, inf_id = _first_argmax(inf_keys, inf_ids, 1)
    token = tl.where(inf_best > float("-inf"), inf_id, tl.where(best > float("-inf"), best_id, 0))
    tl.store(out_ptr + rows, token.to(tl.int64), mask=row_ok)


def gumbel_max_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seed: int,
    rows: torch.Tensor | None = None,
    *,
    block_size: int = _BLOCK,
    tiles_per_chunk: int = _TILES_PER_CHUNK,
) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature), in one pass over the logits.

    `logits` [n, V] fp32 / bf16 / fp16 with a contiguous last dim; `temperature` [n] > 0 (any
    float dtype); `seed` an int in [0, 2**63). Returns [n] int64 token ids on the logits' device.
    Row r's token is argmax_i (logit_i / T_r - log(-log(U_i))), U_i = tl.rand(seed, r * V + i)
    (see `philox_uniforms`); NaN / inf rows as described in the module docstring.

    With `rows` (int64 [m] indices into logits), output j samples logits[rows[j]] at temperature
    temperature[rows[j]] with the noise of row j: the same as sampling logits[rows] and
    temperature[rows] without the copy. `block_size` (a power of two) and `tiles_per_chunk` set
    a program's share of a row (tests shrink them to get several chunks on a small vocabulary).
    No host sync: the launch depends on shapes only.
    """
    if logits.dim() != 2:
        raise ValueError(f"gumbel_max_sample needs [rows, vocab] logits, got shape {tuple(logits.shape)}.")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_src, vocab_size = logits.shape
    n_rows = n_src if rows is None else rows.shape[0]
    if n_rows == 0 or vocab_size == 0:
        return torch.zeros(n_rows, dtype=torch.int64, device=logits.device)
    block = min(block_size, triton.next_power_of_2(vocab_size))
    # A vocabulary smaller than a tile shares it between rows (e.g. 128 rows of 8 tokens).
    rows_per_program = max(1, block_size // block)
    tiles = min(tiles_per_chunk, triton.cdiv(vocab_size, block))
    n_chunks = triton.cdiv(vocab_size, tiles * block)
    keys = torch.empty(2, n_rows, n_chunks, dtype=torch.float32, device=logits.device)
    ids = torch.empty(2, n_rows, n_chunks, dtype=torch.int32, device=logits.device)
    temperature = temperature.contiguous()
    row_ids = rows.to(torch.int64).contiguous() if rows is not None else temperature  # unused when None
    _race_partial_kernel[(triton.cdiv(n_rows, rows_per_program), n_chunks)](
        logits, temperature, row_ids,
        keys[0], ids[0], keys[1], ids[1],
        seed, n_rows, vocab_size, logits.stride(0), n_chunks,
        ROWS=rows_per_program, BLOCK=block, TILES=tiles, HAS_ROWS=rows is not None,
        # 4 tokens per thread and tile (one 16-byte fp32 load): ~40 registers on sm_90, so the
        # Philox arithmetic, which bounds this kernel more than memory does, keeps many warps.
        num_warps=max(1, min(8, block_size // 128)),
    )
    out = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    block_c = triton.next_power_of_2(n_chunks)
    reduce_rows = max(1, min(64, 1024 // block_c))
    _race_reduce_kernel[(triton.cdiv(n_rows, reduce_rows),)](
        keys[0], ids[0], keys[1], ids[1], out,
        n_rows, n_chunks,
        ROWS=reduce_rows, BLOCK_C=block_c,
        num_warps=1,
    )
    return out


@triton.jit(do_not_specialize=["seed", "vocab_size"])
def _uniforms_kernel(out_ptr, seed, vocab_size, BLOCK: tl.constexpr):
    """Program (row, column block): out[row, col] = tl.rand(seed, row * vocab_size + col)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = row * vocab_size + cols  # the same int64 counters as _race_partial_kernel
    tl.store(out_ptr + offs, tl.rand(seed, offs), mask=cols < vocab_size)


def philox_uniforms(seed: int, n_rows: int, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """[n_rows, vocab_size] fp32: the U values `gumbel_max_sample(..., seed)` draws (for tests)."""
    out = torch.empty(n_rows, vocab_size, dtype=torch.float32, device=device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(vocab_size))
        _uniforms_kernel[(n_rows, triton.cdiv(vocab_size, block))](out, seed, vocab_size, BLOCK=block)
    return out
