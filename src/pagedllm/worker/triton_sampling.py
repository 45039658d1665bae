"""One-pass Triton sampling of temperature-only random rows (the Gumbel-max trick).

Row r of `logits` gets the token argmax_i (logit_i / T_r + G_i) with Gumbel noise
G_i = -log(E_i), E_i = -log(U_i) ~ Exp(1). This is the sampler's exponential race (argmax P_i / E_i
with P = exp(logit / T)) in log space: token i is drawn with probability softmax(logits / T)_i,
and no row max, exp or normalisation is needed, so each logit is read once and nothing is
written but a few bytes per program.

The uniforms come from Philox4x32-10, four per evaluation: U of token i of row r is component
i % 4 of philox(seed, counter r * ceil(V / 4) + i // 4), mapped to [0, 1) as tl.rand maps its
int32 (`philox_uniforms` returns them). The first version drew U_i = tl.rand(seed, r * V + i),
a full 10-round Philox per token of which it kept one output in four: 225 us for 256 x
151,936 fp32 logits on an H200, i.e. 0.7 TB/s, bound by instruction issue (Philox two thirds
of it), not by memory.
Rows start on a counter boundary whatever V is, so every tile that starts at a multiple of 4
inside a row holds whole Philox groups. In the sm_90 code of the tile loop this takes a token
from ~134 instructions to ~71 (Triton 3.6, fp32; Philox ~15 of them now).

Per token that leaves two logarithms as the largest cost (~30). They keep libdevice's accuracy
(`_log`: its steps without its branches for inputs the race never has). The hardware's
lg2.approx would be cheaper, but its error bound is absolute near 1: -log(U) for U next to 1,
where the largest G come from, would lose its digits, and that changes the distribution.

The PyTorch path takes ~10 full passes over the [rows, vocab] fp32 logits (amax, sub, div, exp,
uniform_, log, div, argmax, gather) and host syncs; this is two launches and no sync:

1. `_race_partial_kernel`, grid (row blocks, vocabulary chunks): a program races its chunk of
   8192 tokens (tiles of 1024) and writes its winner (key, token) plus a second winner among
   the +inf logits, keyed by noise alone, which a second pass over the chunk computes only if
   the chunk holds a +inf. 256 rows x 151,936 tokens make 256 x 19 programs. Small
   vocabularies put several rows in one tile instead.
2. `_race_reduce_kernel`: per row, the best of those partials.

Bad values follow `sanitized()` in sampler.py: NaN counts as -inf; a row holding +inf draws
uniformly among its +inf entries; a row with nothing finite returns token 0. U == 0 (probability
2**-31 per token) makes G = -inf: such a key is raised to -FLT_MAX so a finite logit still beats
a -inf or NaN one. Ties go to the lowest token id, as torch.argmax.

Integers that change between calls (seed, row count, strides) are `do_not_specialize`: Triton
would otherwise specialise ints equal to 1 or divisible by 16 and recompile for a new seed or
batch size. Tile shapes depend on the vocabulary size only (and on whether V and the row stride
are multiples of 4, which lets a thread load its Philox group as one vector). Under
TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests). The seed is a kernel argument: do
not capture these launches in a CUDA graph, whose replays would reuse the captured seed.

Greedy rows (`greedy_sample`) use the same two-kernel split without noise: `_argmax_partial_kernel`
keeps each chunk's first maximum of the raw logits (NaN counted as -inf) and `_race_reduce_kernel`
picks the first of those per row, so a single row is spread over many SMs, where torch.argmax
runs a row in one CTA (28 us for 128,256 bf16 logits in a batch-1 decode profile). Its tokens are
the sampler's `sample_greedy` (torch.argmax after NaN -> -inf) bit for bit: the first maximum,
the first +inf of a row holding +inf, token 0 in a row without a finite or +inf entry. It has no
seed and no host sync: it may be captured in a CUDA graph. Chunks are sized by the batch (a
runtime loop bound), so one compiled variant still serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.worker.sharded_sampling import Partials

# Tokens per tile (lanes of one program: 4 per thread with 8 warps).
_BLOCK = 1024
# Tiles per program: a chunk of 8192 tokens amortises the per-program reductions while
# 151,936 tokens still split into 19 chunks per row (thousands of programs at batch 256).
_TILES_PER_CHUNK = 8
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32


@triton.jit
def _log(x):
    """ln(x) of normal, positive, finite fp32 x: the steps of libdevice's logf (tl.log), minus its
    branches for 0, subnormal, inf and NaN inputs, which the race never has.

    x = 2**k * m with m in [2/3, 4/3); ln(x) = k ln 2 + ln(1 + f), f = m - 1 (exact), by
    libdevice's polynomial with its constants and fused multiply-adds (< 1 ulp). Written out
    because those branches cost a third of each tl.log (~22 instructions on sm_90, this ~15),
    and the two logs per token were half of the tile loop once Philox was shared by 4 tokens.
    """
    bits = x.to(tl.int32, bitcast=True)
    k_bits = (bits - 0x3F2AAAAB) & -8388608  # (bits - bits(2/3)) & 0xFF800000: k << 23
    f = (bits - k_bits).to(tl.float32, bitcast=True) - 1.0
    p = tl.fma(f, -0.13018856942653656, 0.1408461034297943)
    p = tl.fma(p, f, -0.12148627638816833)
    p = tl.fma(p, f, 0.1398061066865921)
    p = tl.fma(p, f, -0.16684235632419586)
    p = tl.fma(p, f, 0.20012299716472626)
    p = tl.fma(p, f, -0.24999669194221497)
    p = tl.fma(p, f, 0.333331823348999)
    p = tl.fma(p, f, -0.5)
    # k ln 2 = (k << 23) * (ln 2 * 2**-23): the same exact product, one multiply fewer.
    return tl.fma(k_bits.to(tl.float32), 8.262958317573066e-08, tl.fma(f * p, f, f))


@triton.jit
def _race_keys(x, u, temperature):
    """(key, inf_key) of logits x [fp32] with uniforms u and per-row temperature [ROWS, 1].

    key = x / T + G over finite x (-inf elsewhere, so NaN / -inf never win); inf_key = G over
    +inf entries (-inf elsewhere). Both are at least -FLT_MAX where they count: U == 0 gives
    G = -inf, which must still beat an entry that does not count.
    """
    # u in [2**-31, 1 - 2**-24] or 0, so -ln(u) in [2**-24, 21.5]: both logs see normal inputs.
    gumbel = tl.where(u > 0.0, -_log(-_log(u)), float("-inf"))
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


@triton.jit
def _keep_first_max(key, cols, best, best_id):
    """Per-lane running winners (best, best_id) updated with the tile (key, cols).

    Strict ">": a lane sees its tokens in increasing order, so ties keep the first.
    """
    better = key > best
    return tl.where(better, key, best), tl.where(better, cols, best_id)


@triton.jit
def _token_uniforms(seed, group_base, first_col, BLOCK: tl.constexpr):
    """[R, BLOCK] uniforms of tokens first_col + arange(BLOCK) of R rows (first_col % 4 == 0).

    `group_base` [R, 1] int64 is each row's first Philox counter (row r: r * ceil(V / 4)). Token
    i of a row is component i % 4 of philox(seed, group_base + i // 4): one Philox evaluation
    (10 rounds) serves four neighbouring tokens. Both kernels draw through this function, so
    `philox_uniforms` cannot disagree with the sampler.
    """
    groups = group_base + (first_col // 4 + tl.arange(0, BLOCK // 4))[None, :]
    # tl.rand4x: the four int32 outputs mapped to [0, 1) exactly as tl.rand maps its one.
    u0, u1, u2, u3 = tl.rand4x(seed, groups)
    # tl.join(a, b) stacks along a new minor dim: [..., 0] = a, [..., 1] = b. So the outer join
    # gives [r, g, i, j] = u_{2i+j}[r, g] (j picks the inner pair, i the element in it), and
    # the order-keeping reshape puts it at column 4g + 2i + j.
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))
    return tl.reshape(u, (u.shape[0], BLOCK))


@triton.jit
def _load_tile(row_ptrs, row_ok, vocab_size, start, BLOCK: tl.constexpr):
    """(token ids [1, BLOCK], logits [ROWS, BLOCK] fp32) of tokens start + arange(BLOCK); -inf past
    the vocabulary and in rows past the batch. Widening bf16 / fp16 to fp32 is exact."""
    cols = (start + tl.arange(0, BLOCK))[None, :]
    mask = row_ok[:, None] & (cols < vocab_size)
    return cols, tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _tile(row_ptrs, row_ok, n_cols, seed, group_base, start, col_offset, BLOCK: tl.constexpr):
    """(token ids [1, BLOCK], logits [ROWS, BLOCK] fp32, uniforms) of the local columns
    start + arange(BLOCK), which are tokens col_offset + start + arange(BLOCK)."""
    cols, x = _load_tile(row_ptrs, row_ok, n_cols, start, BLOCK)
    # Tiles start at multiples of BLOCK (>= 4) and col_offset % 4 == 0: every tile is whole
    # Philox groups.
    return cols + col_offset, x, _token_uniforms(seed, group_base, col_offset + start, BLOCK)


@triton.jit(do_not_specialize=["seed", "n_rows", "n_cols", "col_offset", "vocab_size", "stride_row", "n_chunks"])
def _race_partial_kernel(
    logits_ptr, temperature_ptr, rows_ptr,
    keys_ptr, ids_ptr, inf_keys_ptr, inf_ids_ptr,
    seed, n_rows, n_cols, col_offset, vocab_size, stride_row, n_chunks,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, HAS_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Program (row block, chunk): the winners of ROWS rows over TILES * BLOCK tokens.

    The logits hold columns [col_offset, col_offset + n_cols) of a `vocab_size` vocabulary (all
    of it unless the vocabulary is split over tensor-parallel ranks): ids and noise are the
    whole vocabulary's."""
    if ALIGNED:
        # The host checked n_cols % 4 == 0 and stride_row % 4 == 0 (no-ops here, spelled so that
        # Triton's alignment analysis sees them). With a 16-byte aligned base, which Triton
        # specialises on, a thread then loads its tokens 4i..4i+3 with one vector load, in the
        # layout _token_uniforms yields them: no shared-memory shuffle of the tile. Otherwise
        # the loads stay scalar (thread t: tokens t, t + 256, ...) and each tile is reshuffled
        # through shared memory (with barriers) to meet the Philox groups: correct, slower.
        stride_row = stride_row // 4 * 4
        n_cols = n_cols // 4 * 4
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
    # int64: no wrap past 2**31 counters. Rows start on a group boundary whatever V is.
    group_base = (out_rows * ((vocab_size + 3) // 4))[:, None]
    first = chunk * (TILES * BLOCK)
    # Per-lane running winners; one cross-lane reduction at the end instead of one per tile.
    best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
    best_id = tl.zeros((ROWS, BLOCK), tl.int32)
    x_max = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
    for t in range(TILES):
        cols, x, u = _tile(row_ptrs, row_ok, n_cols, seed, group_base, first + t * BLOCK, col_offset, BLOCK)
        key, _ = _race_keys(x, u, temperature)
        best, best_id = _keep_first_max(key, cols, best, best_id)
        x_max = tl.maximum(x_max, x)  # maxnum: NaN is skipped
    chunk_best, chunk_id = _first_argmax(best, best_id, 1)
    # The race among +inf logits cost ~5 of ~76 instructions a token in the loop and is almost
    # never needed: it runs as a second pass over the chunk (same tokens, same noise), only if
    # the first one read a +inf.
    chunk_inf = tl.full((ROWS,), float("-inf"), tl.float32)
    chunk_inf_id = tl.zeros((ROWS,), tl.int32)
    if tl.max(tl.max(x_max, 1), 0) == float("inf"):
        inf_best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
        inf_id = tl.zeros((ROWS, BLOCK), tl.int32)
        for t in range(TILES):
            cols, x, u = _tile(row_ptrs, row_ok, n_cols, seed, group_base, first + t * BLOCK, col_offset, BLOCK)
            _, inf_key = _race_keys(x, u, temperature)
            inf_best, inf_id = _keep_first_max(inf_key, cols, inf_best, inf_id)
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
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_INF: tl.constexpr,
):
    """Program: ROWS rows' token = the +inf winner if any, else the finite winner, else 0.

    Without HAS_INF (greedy: +inf is an ordinary key there) the inf partials are not read.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    chunks = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (chunks < n_chunks)[None, :]
    offs = rows[:, None] * n_chunks + chunks[None, :]
    keys = tl.load(keys_ptr + offs, mask=mask, other=float("-inf"))
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    # Chunks hold increasing token ranges: the smallest id among tied chunks is the first token.
    best, best_id = _first_argmax(keys, ids, 1)
    token = tl.where(best > float("-inf"), best_id, 0)
    if HAS_INF:
        inf_keys = tl.load(inf_keys_ptr + offs, mask=mask, other=float("-inf"))
        inf_ids = tl.load(inf_ids_ptr + offs, mask=mask, other=0)
        inf_best, inf_id = _first_argmax(inf_keys, inf_ids, 1)
        token = tl.where(inf_best > float("-inf"), inf_id, token)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "n_cols", "col_offset", "stride_row", "n_chunks", "tiles"])
def _argmax_partial_kernel(
    logits_ptr, keys_ptr, ids_ptr,
    n_rows, n_cols, col_offset, stride_row, n_chunks, tiles,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    """Program (row block, chunk): each of ROWS rows' first maximum over `tiles` * BLOCK tokens,
    NaN counted as -inf (key -inf and id 0 when the chunk holds nothing else). The logits are
    tokens [col_offset, col_offset + n_cols)."""
    if VEC > 1:
        # The host checked n_cols % VEC == 0 and stride_row % VEC == 0 (no-ops, spelled for Triton's
        # alignment analysis, as in _race_partial_kernel): a thread's VEC tokens, 16 bytes of bf16,
        # are then one vector load.
        stride_row = stride_row // VEC * VEC
        n_cols = n_cols // VEC * VEC
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    chunk = tl.program_id(1)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + (rows * stride_row)[:, None]
    first = chunk * tiles * BLOCK
    best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
    best_id = tl.zeros((ROWS, BLOCK), tl.int32)
    # `tiles` is a runtime loop bound: the host sizes chunks by the batch without a recompile.
    for t in range(tiles):
        cols, x = _load_tile(row_ptrs, row_ok, n_cols, first + t * BLOCK, BLOCK)
        # NaN > anything is false: from -inf, a NaN never becomes a lane's best, i.e. it counts as
        # -inf with no pass of its own (a lane with nothing above -inf keeps id 0).
        best, best_id = _keep_first_max(x, cols + col_offset, best, best_id)
    chunk_best, chunk_id = _first_argmax(best, best_id, 1)
    offs = rows * n_chunks + chunk
    tl.store(keys_ptr + offs, chunk_best, mask=row_ok)
    tl.store(ids_ptr + offs, chunk_id, mask=row_ok)


def _tile_size(vocab_size: int, block_size: int) -> int:
    """Tokens per tile: a power of two, at most block_size, at least one Philox group of 4."""
    return max(4, min(block_size, triton.next_power_of_2(vocab_size)))


def _rows_of_logits(logits: torch.Tensor, caller: str) -> torch.Tensor:
    """`logits` checked to be [rows, vocab], with a contiguous last dim (copied if not)."""
    if logits.dim() != 2:
        raise ValueError(f"{caller} needs [rows, vocab] logits, got shape {tuple(logits.shape)}.")
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _check_block_size(block_size: int) -> None:
    if block_size < 4 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 4, got {block_size}.")


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
    Row r's token is argmax_i (logit_i / T_r - log(-log(U_i))) with U_i component i % 4 of
    Philox(seed, r * ceil(V / 4) + i // 4) (see `philox_uniforms`); NaN / inf rows as described
    in the module docstring.

    With `rows` (int64 [m] indices into logits), output j samples logits[rows[j]] at temperature
    temperature[rows[j]] with the noise of row j: the same as sampling logits[rows] and
    temperature[rows] without the copy. `block_size` (a power of two, at least 4) and
    `tiles_per_chunk` set a program's share of a row (tests shrink them to get several chunks on
    a small vocabulary); they do not change the draws.
    No host sync: the launch depends on shapes only.
    """
    partials = race_partials(logits, temperature, seed, rows, block_size=block_size, tiles_per_chunk=tiles_per_chunk)
    return reduce_partials(partials)


def race_partials(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seed: int,
    rows: torch.Tensor | None = None,
    *,
    col_offset: int = 0,
    num_tokens: int | None = None,
    vocab_size: int | None = None,
    block_size: int = _BLOCK,
    tiles_per_chunk: int = _TILES_PER_CHUNK,
) -> Partials:
    """The first pass of `gumbel_max_sample`: each row's winner per chunk of the logits.

    The logits [n, width] may be one tensor-parallel rank's slice of a `vocab_size` vocabulary
    (None: the logits are all of it): tokens [col_offset, col_offset + num_tokens) in its first
    num_tokens columns (None: all), the rest padding that is never read. The partials then carry
    the whole vocabulary's token ids and noise, so that reducing every slice's partials together
    (`sharded_sampling.gather_partials`) draws `gumbel_max_sample`'s token of the whole row, bit
    for bit. col_offset must be a multiple of 4 (whole Philox groups). The chunks follow the
    width, so slices of one width give partials of one shape.
    """
    logits = _rows_of_logits(logits, "gumbel_max_sample")
    n_src, width = logits.shape
    n_cols = width if num_tokens is None else num_tokens
    vocab_size = n_cols if vocab_size is None else vocab_size
    if col_offset % 4 or col_offset + n_cols > vocab_size or n_cols > width:
        raise ValueError(f"columns [{col_offset}, {col_offset + n_cols}) are not a 4-aligned slice of a "
                         f"{vocab_size}-token vocabulary in {width} logits.")
    n_rows = n_src if rows is None else rows.shape[0]
    _check_block_size(block_size)
    block = _tile_size(vocab_size, block_size)
    # A vocabulary smaller than a tile shares it between rows (e.g. 128 rows of 8 tokens).
    rows_per_program = max(1, block_size // block)
    tiles = min(tiles_per_chunk, triton.cdiv(max(width, 1), block))
    n_chunks = triton.cdiv(max(width, 1), tiles * block)
    # Four separate buffers, not views of one: Triton specialises on pointer alignment, and a view
    # at offset n_rows * n_chunks would compile a second variant of both kernels for some batch sizes.
    keys, inf_keys = (torch.empty(n_rows, n_chunks, dtype=torch.float32, device=logits.device) for _ in range(2))
    ids, inf_ids = (torch.empty(n_rows, n_chunks, dtype=torch.int32, device=logits.device) for _ in range(2))
    if n_cols == 0:  # an empty slice: nothing wins
        for t in (keys, inf_keys):
            t.fill_(float("-inf"))
        for t in (ids, inf_ids):
            t.zero_()
    elif n_rows:
        temperature = temperature.contiguous()
        row_ids = rows.to(torch.int64).contiguous() if rows is not None else temperature  # unused when None
        _race_partial_kernel[(triton.cdiv(n_rows, rows_per_program), n_chunks)](
            logits, temperature, row_ids,
            keys, ids, inf_keys, inf_ids,
            seed, n_rows, n_cols, col_offset, vocab_size, logits.stride(0), n_chunks,
            ROWS=rows_per_program, BLOCK=block, TILES=tiles, HAS_ROWS=rows is not None,
            ALIGNED=n_cols % 4 == 0 and logits.stride(0) % 4 == 0,
            # 4 tokens per thread and tile, one Philox group (one 16-byte fp32 load when ALIGNED):
            # ~47 registers on sm_90, so the arithmetic, which bounds this kernel more than memory
            # does, keeps many warps.
            num_warps=max(1, min(8, block_size // 128)),
        )
    return Partials(keys, ids, inf_keys, inf_ids, block_c=triton.next_power_of_2(n_chunks))


def reduce_partials(partials: Partials) -> torch.Tensor:
    """Each row's winner over its partial (key, id) pairs: [n_rows] int64 (the +inf race first
    when the partials have one, then the finite winner, then token 0)."""
    n_rows, n_chunks = partials.keys.shape
    out = torch.empty(n_rows, dtype=torch.int64, device=partials.keys.device)
    if n_rows == 0:
        return out
    has_inf = partials.inf_keys is not None
    reduce_rows = max(1, min(64, 1024 // partials.block_c))
    _race_reduce_kernel[(triton.cdiv(n_rows, reduce_rows),)](
        partials.keys, partials.ids,
        partials.inf_keys if has_inf else partials.keys, partials.inf_ids if has_inf else partials.ids, out,
        n_rows, n_chunks,
        ROWS=reduce_rows, BLOCK_C=partials.block_c, HAS_INF=has_inf,
        num_warps=1,
    )
    return out


# Greedy: how many partial programs a batch aims for. Batch 1 x 128,256 then gets 126 programs of
# one tile (a row over as many SMs), batch 256 chunks of _TILES_PER_CHUNK tiles, as the race.
_GREEDY_PROGRAMS = 2048
# Logit dtypes greedy_sample reads (exactly, widened to fp32).
GREEDY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def greedy_sample(
    logits: torch.Tensor,
    *,
    block_size: int = _BLOCK,
    tiles_per_chunk: int | None = None,
) -> torch.Tensor:
    """torch.argmax(logits, -1) with NaN counted as -inf, split across programs: [n] int64.

    `logits` [n, V] fp32 / bf16 / fp16 (read as they are) with a contiguous last dim. Row r's token
    is the first index of its maximum, the first +inf when it holds one, 0 when it holds nothing
    but -inf and NaN: `sample_greedy`'s result bit for bit. No host sync and no seed, so the
    launches may be captured in a CUDA graph. `block_size` (a power of two, at least 4) and
    `tiles_per_chunk` (default: from the batch size) set a program's share of a row (tests shrink
    them to get several chunks on a small vocabulary); they do not change the result.
    """
    return reduce_partials(argmax_partials(logits, block_size=block_size, tiles_per_chunk=tiles_per_chunk))


def argmax_partials(
    logits: torch.Tensor,
    *,
    col_offset: int = 0,
    num_tokens: int | None = None,
    block_size: int = _BLOCK,
    tiles_per_chunk: int | None = None,
) -> Partials:
    """The first pass of `greedy_sample`: each row's first maximum per chunk of the logits, with
    token ids counted from `col_offset`, over the first `num_tokens` columns (None: all); a
    tensor-parallel rank's slice of the vocabulary, as in `race_partials` (any offset will do)."""
    logits = _rows_of_logits(logits, "greedy_sample")
    if logits.dtype not in GREEDY_DTYPES:
        # Read as fp32: a wider type could round distinct values into a tie.
        raise ValueError(f"greedy_sample reads fp32, bf16 or fp16 logits, got {logits.dtype}.")
    n_rows, width = logits.shape
    n_cols = width if num_tokens is None else min(num_tokens, width)
    _check_block_size(block_size)
    block = _tile_size(max(width, 1), block_size)
    rows_per_program = max(1, block_size // block)
    n_tiles = triton.cdiv(max(width, 1), block)
    if tiles_per_chunk is None:
        tiles_per_chunk = min(_TILES_PER_CHUNK, triton.cdiv(max(n_rows, 1) * n_tiles, _GREEDY_PROGRAMS))
    tiles = max(1, min(tiles_per_chunk, n_tiles))
    n_chunks = triton.cdiv(n_tiles, tiles)
    keys = torch.empty(n_rows, n_chunks, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n_rows, n_chunks, dtype=torch.int32, device=logits.device)
    if n_cols == 0:  # an empty slice: nothing wins
        keys.fill_(float("-inf"))
        ids.zero_()
    elif n_rows:
        vec = 8 if n_cols % 8 == 0 and logits.stride(0) % 8 == 0 else 1
        _argmax_partial_kernel[(triton.cdiv(n_rows, rows_per_program), n_chunks)](
            logits, keys, ids,
            n_rows, n_cols, col_offset, logits.stride(0), n_chunks, tiles,
            ROWS=rows_per_program, BLOCK=block, VEC=vec,
            # 8 tokens a thread (one 16-byte load of bf16): nothing to compute, memory bound.
            num_warps=max(1, min(4, block_size // 256)),
        )
    # The reduce is sized for the most chunks this vocabulary can have (one tile each), not for
    # n_chunks: one compiled reduce serves every batch size.
    return Partials(keys, ids, block_c=triton.next_power_of_2(n_tiles))


@triton.jit(do_not_specialize=["seed", "vocab_size"])
def _uniforms_kernel(out_ptr, seed, vocab_size, BLOCK: tl.constexpr):
    """Program (row, column block): out[row, cols] = the uniforms `_race_partial_kernel` draws."""
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK
    cols = first + tl.arange(0, BLOCK)
    group_base = tl.full((1, 1), 0, tl.int64) + row * ((vocab_size + 3) // 4)
    u = tl.reshape(_token_uniforms(seed, group_base, first, BLOCK), (BLOCK,))
    tl.store(out_ptr + row * vocab_size + cols, u, mask=cols < vocab_size)


def philox_uniforms(seed: int, n_rows: int, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """[n_rows, vocab_size] fp32: the U values `gumbel_max_sample(..., seed)` draws (for tests).

    U[r, i] is component i % 4 of Philox(seed, counter r * ceil(vocab_size / 4) + i // 4),
    mapped to [0, 1) as tl.rand maps its int32.
    """
    out = torch.empty(n_rows, vocab_size, dtype=torch.float32, device=device)
    if out.numel():
        block = _tile_size(vocab_size, 1024)
        _uniforms_kernel[(n_rows, triton.cdiv(vocab_size, block))](out, seed, vocab_size, BLOCK=block)
    return out
