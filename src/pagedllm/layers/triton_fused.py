"""Fused Triton kernels for the elementwise layers of a decoder block (the CUDA path).

Unfused, one Llama block runs ~9 small PyTorch kernels besides its GEMMs and attention (residual
add, fp32 casts, variance, rsqrt, weight multiply, rotary gather/cat/mul, silu, mul); a decode
step of a 28-layer model launches ~225 of them, each a full round trip through memory. These
kernels do each layer in one pass:

- `rms_norm` / `fused_add_rms_norm`: (x + residual -> residual_out), then RMSNorm -> out.
- `rotary_embedding_`: NeoX-style (rotate-half) RoPE on query and key, in place, in one launch.
- `silu_and_mul` / `gelu_tanh_and_mul`: act(gate) * up over a fused [gate | up] projection.

Numerics follow the PyTorch layers (the CPU path, which is the oracle): statistics and products
in fp32, with the same intermediate roundings to the activation dtype (e.g. the residual sum is
rounded before its variance is taken, the normalised value before the weight multiply), so bf16
results differ from torch only by fp32 reduction order.

Every launcher is CUDA-graph capturable: no host syncs, outputs allocated by shape only, and
token counts enter only through the grid (never as a specialised or constexpr argument, so a new
batch size never recompiles). Under TRITON_INTERPRET=1 they run on CPU tensors (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest row the single-tile norm kernel holds in registers (fp32 elements per program).
MAX_NORM_BLOCK = 16384
# Elements of one program's tile in the norm / rotary kernels when several rows share it.
_TILE_ELEMENTS = 4096
# Output elements per program of the gated activations.
_ACT_BLOCK = 1024


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    n_rows, inner, eps,
    stride_x0, stride_x1, stride_r, stride_out, stride_rout,
    N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """ROWS rows of N per program. Row r of x lives at (r // inner) * stride_x0 + (r % inner) *
    stride_x1, so a [T, H, D] head view of a fused QKV output is read in place."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < N)[None, :]
    x_offs = (rows // inner) * stride_x0 + (rows % inner) * stride_x1
    x = tl.load(x_ptr + x_offs[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + (rows * stride_r)[:, None] + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the activation dtype first: torch's `x + residual` does, and the
        # stored residual and the normalised value must come from the same number.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + (rows * stride_rout)[:, None] + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=1) / N
    normed = xf * tl.rsqrt(variance + eps)[:, None]
    # As the torch layer: weight * normed.to(dtype), the product rounded once more.
    normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    out = normed * w[None, :]
    tl.store(out_ptr + (rows * stride_out)[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x, inner, stride0, stride1): x's rows of its last dim as at most two strided levels.

    [T, N] and [T, H, N] views (e.g. per-head q/k of a fused QKV output) are used in place;
    other layouts are copied first.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() > 3 or x.dim() == 1:
        x = x.reshape(-1, x.shape[-1])
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    return x, 1, x.stride(0), 0


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    block_n = triton.next_power_of_2(hidden)
    if block_n > MAX_NORM_BLOCK:
        raise ValueError(f"rms_norm supports rows up to {MAX_NORM_BLOCK} elements, got {hidden}.")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows_view, inner, stride0, stride1 = _norm_rows(x)
    n_rows = out.numel() // hidden if hidden else 0
    if n_rows == 0:
        return out, (torch.empty_like(out) if residual is not None else None)
    residual_out = None
    if residual is not None:
        residual = residual.reshape(n_rows, hidden)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = max(1, min(_TILE_ELEMENTS // block_n, 16))
    # About 16 fp32 elements per thread (32 for the widest rows).
    num_warps = max(1, min(block_n * rows // 512, 16))
    res_arg = residual if residual is not None else rows_view
    res_out_arg = residual_out if residual_out is not None else out
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        rows_view, res_arg, weight, out, res_out_arg,
        n_rows, inner, eps,
        stride0, stride1, res_arg.stride(0) if residual is not None else 0, hidden, hidden,
        N=hidden, BLOCK_N=block_n, ROWS=rows, HAS_RESIDUAL=residual is not None,
        num_warps=num_warps,
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., N], last dim contiguous; any 2-level row strides)."""
    return _norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one pass; x and residual are left unchanged."""
    out, residual_out = _norm_launch(x, residual, weight, eps)
    assert residual_out is not None
    return out, residual_out


@triton.jit
def _rotate_heads(
    base_ptr, token, stride_t, stride_h, num_heads, head_start, cos, sin, offs_h, offs_d,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate heads [head_start, head_start + BLOCK_H) of one token in place (masked to num_heads)."""
    heads = head_start + offs_h
    mask = (heads < num_heads)[:, None]
    if BLOCK_HALF != HALF:
        mask = mask & (offs_d < HALF)[None, :]
    ptrs = base_ptr + token * stride_t + heads[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # rotate_half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (cos/sin equal on both halves).
    tl.store(ptrs, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(ptrs + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit(do_not_specialize=["first_token"])
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, first_token,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (token, head block): rotate BLOCK_H query heads and the same key head block."""
    token = tl.program_id(0).to(tl.int64) + first_token
    head_start = tl.program_id(1) * BLOCK_H
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    # The cache rows hold [freqs, freqs]: the first half is every frequency once.
    cs_mask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cache + offs_d, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cache + offs_d, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, NUM_Q_HEADS, head_start, cos, sin, offs_h, offs_d,
                  HALF, BLOCK_HALF)
    if head_start < NUM_K_HEADS:
        _rotate_heads(k_ptr, token, stride_kt, stride_kh, NUM_K_HEADS, head_start, cos, sin, offs_h, offs_d,
                      HALF, BLOCK_HALF)


def rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    rotary_dim: int,
    first_token: int = 0,
) -> None:
    """Rotate the first `rotary_dim` dims of query [T, H, D] and key [T, Hkv, D] in place.

    Tokens before `first_token` are left alone (the decodes of a mixed batch, which the decode
    attention kernel rotates itself): an offset, not a slice, so the tensors keep their alignment
    and the kernel its compiled variant.

    NeoX layout (rotate-half, as Hugging Face Llama/Qwen). `cos_cache` / `sin_cache` are
    [max_position, rotary_dim] with each frequency twice ([freqs, freqs], as RotaryEmbedding
    builds them); `positions` [T] index their rows. Dims past rotary_dim (partial rotary) are
    untouched. query/key may be strided views (e.g. of a fused QKV output); their last dim must
    be contiguous.
    """
    num_tokens = positions.shape[0] - first_token
    if num_tokens <= 0:
        return
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("rotary_embedding_ rotates in place and needs a contiguous last dim.")
    if cos_cache.stride(-1) != 1 or cos_cache.stride() != sin_cache.stride():
        raise ValueError("cos_cache and sin_cache must be contiguous in their last dim and share strides.")
    num_q_heads, num_k_heads = query.shape[1], key.shape[1]
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(1, _TILE_ELEMENTS // 2 // block_half))
    grid = (num_tokens, triton.cdiv(max(num_q_heads, num_k_heads), block_h))
    _rotary_kernel[grid](
        positions, query, key, cos_cache, sin_cache, first_token,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads,
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h,
        num_warps=4 if block_h * block_half >= 1024 else 1,
    )


@triton.jit
def _gated_act_kernel(
    x_ptr, out_ptr, stride_x, stride_out,
    D: tl.constexpr, BLOCK: tl.constexpr, GELU_TANH: tl.constexpr,
):
    """Program (row, column block): out = act(x[:D]) * x[D:2D], act rounded to dtype first."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, gated_act_tile(gate, up, GELU_TANH), mask=mask)


@triton.jit
def gated_act_tile(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up for two tiles of one dtype, in that dtype, with torch's roundings.

    Shared with the skinny GEMM's gated input (triton_gemv.py), so the fused down projection
    multiplies exactly the values this module's silu_and_mul / gelu_tanh_and_mul would write.
    """
    g = gate.to(tl.float32)
    if GELU_TANH:
        # 0.5 (1 + tanh(y)) == sigmoid(2y): gelu_tanh(g) = g * sigmoid(2c (g + 0.044715 g^3)),
        # c = sqrt(2 / pi), 2c = 1.5957691216057308.
        act = g / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
    else:
        act = g / (1.0 + tl.exp(-g))
    # torch rounds act(gate) to the dtype before the multiply: do the same.
    act = act.to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


def _gated_act(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] == 0 or d == 0:
        return out
    block = min(_ACT_BLOCK, triton.next_power_of_2(d))
    _gated_act_kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out, rows.stride(0), d,
        D=d, BLOCK=block, GELU_TANH=gelu_tanh,
        num_warps=4 if block >= 512 else 1,
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d] -> [..., d]."""
    return _gated_act(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu(x[..., :d], approximate="tanh") * x[..., d:] for x [..., 2d] -> [..., d]."""
    return _gated_act(x, gelu_tanh=True)
