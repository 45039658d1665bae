"""Residual add + RMSNorm folded into a skinny GEMM: y = rmsnorm(h + r) @ W^T + b for M <= 16.

In a decoder block the add + RMSNorm kernel feeds straight into the QKV (or gate_up)
projection. At decode sizes every skinny-GEMM program reads the whole input row anyway (it owns
BLOCK_N outputs over all of K), so the norm rides along in the same pass:

    s = round(h + r)                 (to the activation dtype, as the fused add+RMSNorm kernel)
    residual_out = s                 (written once, by the programs of the first N block)
    y[n] = rsqrt(mean(s^2) + eps) * sum_k W[n, k] * round(s[k] * norm_weight[k])  (+ b[n])

sum(s^2) is accumulated in fp32 alongside the dot products and the scale is applied at the end,
so there is no extra pass over K. Numerics differ from the unfused pair in the roundings only:
the unfused path rounds normed = s * rsqrt(..) and then normed * norm_weight to the activation
dtype before the matmul; here s * norm_weight is rounded once and the fp32 scale multiplies
the fp32 accumulator (one rounding fewer; results agree within the activation dtype's rounding,
and within fp32 summation order for fp32).

No split-K: the scale needs the whole row's sum of squares, so each program walks all of K
(the candidates are the plain kernel's tile shapes with SPLIT_K = 1, and cuBLAS after the
unfused norm kernel is the tuner's baseline, which wins where that leaves the SMs too idle).
CUDA-graph capturable, no host syncs; M and the row strides are not specialised.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from pagedllm.layers import cuda_gemv
from pagedllm.layers import triton_gemv as tg
from pagedllm.layers.triton_gemv import load_weight_tile

VARIANT = "add_rmsnorm"


@triton.jit
def _norm_input(h_ptrs, r_ptrs, ro_ptrs, nw, mask, WRITE_RESIDUAL):
    """One input tile: s = round(h + r) (stored to residual_out when WRITE_RESIDUAL), returned
    as fp32 with the matmul operand round(s * norm_weight)."""
    h = tl.load(h_ptrs, mask=mask, other=0.0)
    r = tl.load(r_ptrs, mask=mask, other=0.0)
    s = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    if WRITE_RESIDUAL:
        tl.store(ro_ptrs, s, mask=mask)
    sf = s.to(tl.float32)
    return sf, (sf * nw).to(h.dtype)


@triton.jit(do_not_specialize=["M", "stride_hm", "stride_rm", "eps"])
def _norm_gemm_kernel(
    h_ptr, r_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, res_out_ptr,
    M, stride_hm, stride_rm, N, K, eps,
    M_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Program n-block: out[:M, n-block] = rmsnorm(h + r) @ W[n-block]^T (+ bias)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    write_residual = pid_n == 0  # one writer per row
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    if USE_DOT:
        offs_m = tl.arange(0, M_BLOCK)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        h_ptrs = h_ptr + (rows * stride_hm)[:, None] + offs_k[None, :]
        r_ptrs = r_ptr + (rows * stride_rm)[:, None] + offs_k[None, :]
        ro_ptrs = res_out_ptr + (rows * K)[:, None] + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, M_BLOCK), dtype=tl.float32)
        ssq = tl.zeros((M_BLOCK,), dtype=tl.float32)
    else:
        # M_BLOCK == M (1 or 2): one K vector per row, elementwise products reduced after the loop.
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ssq0 = tl.zeros((BLOCK_K,), dtype=tl.float32)  # per lane, reduced after the loop
        ssq1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        k = offs_k + i * BLOCK_K
        k_ok = k < K
        w = load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
        nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if USE_DOT:
            sf, xt = _norm_input(h_ptrs, r_ptrs, ro_ptrs, nw[None, :], m_ok[:, None] & k_ok[None, :],
                                 write_residual)
            ssq += tl.sum(sf * sf, axis=1)
            if DOT_UPCAST:  # the interpreter cannot multiply 16-bit tiles: do it in fp32 there
                acc = tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PREC)
            h_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            ro_ptrs += BLOCK_K
        else:
            wf = w.to(tl.float32)
            sf0, x0 = _norm_input(h_ptr + k, r_ptr + k, res_out_ptr + k, nw, k_ok, write_residual)
            ssq0 += sf0 * sf0
            acc0 += wf * x0.to(tl.float32)[None, :]
            if M_BLOCK > 1:
                sf1, x1 = _norm_input(h_ptr + stride_hm + k, r_ptr + stride_rm + k, res_out_ptr + K + k,
                                      nw, k_ok, write_residual)
                ssq1 += sf1 * sf1
                acc1 += wf * x1.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if USE_DOT:
        scale = tl.rsqrt(ssq / K + eps)
        out = acc * scale[None, :] + bias[:, None]
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], out.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])
    else:
        out0 = tl.sum(acc0, axis=1) * tl.rsqrt(tl.sum(ssq0, axis=0) / K + eps) + bias
        tl.store(out_ptr + offs_n, out0.to(out_ptr.dtype.element_ty), mask=n_ok)
        if M_BLOCK > 1:
            out1 = tl.sum(acc1, axis=1) * tl.rsqrt(tl.sum(ssq1, axis=0) / K + eps) + bias
            tl.store(out_ptr + N + offs_n, out1.to(out_ptr.dtype.element_ty), mask=n_ok)


def norm_candidate_configs(n: int, k: int, m: int, dtype: torch.dtype, sms: int) -> list[tg.GemvConfig]:
    """The plain kernel's candidates without split-K (the scale needs the whole row), deduplicated."""
    seen: list[tg.GemvConfig] = []
    for config in tg.candidate_configs(n, k, m, dtype, sms):
        config = dataclasses.replace(config, split_k=1)
        if config not in seen:
            seen.append(config)
    return seen


def _launch(hidden: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
            weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, residual_out: torch.Tensor,
            config: tg.GemvConfig) -> None:
    if config.use_cuda:
        if cuda_gemv.aligned(hidden, residual, norm_weight, weight):
            cuda_gemv.gemv("add_rmsnorm", hidden, weight, out, bias, residual, norm_weight, eps, residual_out)
            return
        config = norm_candidate_configs(*weight.shape, hidden.shape[0], hidden.dtype, tg.num_sms(hidden.device))[0]
    if config.use_cublas:  # unfused: the add + RMSNorm kernel, then the matmul
        from pagedllm.layers import triton_fused

        normed, summed = triton_fused.fused_add_rms_norm(hidden, residual, norm_weight, eps)
        residual_out.copy_(summed)
        if bias is None:
            torch.mm(normed, weight.t(), out=out)
        else:
            torch.addmm(bias, normed, weight.t(), out=out)
        return
    if config.split_k != 1:
        raise ValueError("the add + RMSNorm skinny GEMM has no split-K")
    m, k = hidden.shape
    n = weight.shape[0]
    use_dot = config.use_dot
    if not use_dot and m > 2:
        raise ValueError(f"the elementwise GEMV path serves at most 2 rows, got {m}")
    _norm_gemm_kernel[(triton.cdiv(n, config.block_n),)](
        hidden, residual, norm_weight, weight, bias if bias is not None else weight, out, residual_out,
        m, hidden.stride(0), residual.stride(0), n, k, eps,
        M_BLOCK=tg._DOT_M if use_dot else m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=use_dot,
        EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0, HAS_BIAS=bias is not None,
        DOT_PREC="ieee" if hidden.dtype == torch.float32 else "tf32",
        DOT_UPCAST=tg._interpreting() and hidden.dtype != torch.float32,
        NUM_STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def skinny_add_rmsnorm_linear(
    hidden: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None, config: tg.GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rmsnorm(hidden + residual), weight, bias), hidden + residual) in one kernel.

    hidden and residual [M, K] (M <= 16, rows contiguous), norm_weight [K], weight [N, K]
    contiguous, bias [N]: all of one dtype (bf16, fp16, fp32). The inputs are left unchanged.
    See the module docstring for the roundings. `config` overrides the tuned choice.
    """
    m, k = hidden.shape
    if (residual.shape != hidden.shape or weight.dim() != 2 or weight.shape[1] != k
            or norm_weight.shape != (k,)):
        raise ValueError(f"skinny_add_rmsnorm_linear needs hidden/residual [M, K], norm weight [K] and "
                         f"weight [N, K], got {tuple(hidden.shape)}, {tuple(residual.shape)}, "
                         f"{tuple(norm_weight.shape)}, {tuple(weight.shape)}")
    if m > tg.MAX_M:
        raise ValueError(f"skinny_add_rmsnorm_linear serves at most {tg.MAX_M} rows, got {m}")
    dtype = hidden.dtype
    if (dtype not in tg.SUPPORTED_DTYPES or any(t.dtype != dtype for t in (residual, norm_weight, weight))
            or (bias is not None and bias.dtype != dtype)):
        raise ValueError(f"skinny_add_rmsnorm_linear needs tensors of one dtype in {tg.SUPPORTED_DTYPES}")
    if not weight.is_contiguous():
        raise ValueError("skinny_add_rmsnorm_linear needs a contiguous weight")
    hidden, residual = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, residual))
    norm_weight = norm_weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=hidden.device)
    residual_out = torch.empty((m, k), dtype=dtype, device=hidden.device)
    if m == 0:
        return out, residual_out
    if n == 0:  # no program would write the residual
        residual_out.copy_(hidden + residual)
        return out, residual_out
    if config is None:
        config = tg.tuned_config(
            VARIANT, m, weight, dtype,
            lambda c: _launch(hidden, residual, norm_weight, eps, weight, bias, out, residual_out, c),
            norm_candidate_configs, extra=lambda: tg.cuda_candidates(hidden, weight, "add_rmsnorm"))
    _launch(hidden, residual, norm_weight, eps, weight, bias, out, residual_out, config)
    return out, residual_out
