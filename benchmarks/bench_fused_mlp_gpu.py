"""Experiment: a decoder block's whole MLP (add + RMSNorm, gate_up, SiLU * up, down) in one kernel.

    PYTHONPATH=src:benchmarks python benchmarks/bench_fused_mlp_gpu.py [--replays 20]

Today a batch-1 MLP is two skinny-GEMM kernels: add + RMSNorm + gate_up (writes [2I]), then down
with the gated activation folded in. Each pays a kernel's start-up and drain, which weigh twice
as much on a TP=2 rank's half-size GEMMs. Here each program owns a range of intermediate rows i:
it computes g_i, u_i (rows of gate and up against the normed input), a_i = silu(g_i) * u_i, and
adds a_i * down[:, i] into its own fp32 partial of the output; the down weight is stored
transposed ([I, H]) so every program streams three contiguous row ranges. The partials
[programs, H] are summed afterwards: by a small reduce kernel at TP=1, inside the all-reduce at
TP=2 (not built here; the "no reduce" rows bound it).

1. Correctness: fused + reduce against today's two kernels and an fp32 reference.
2. Timing: 32 layers' MLPs (each its own weights, so they stream from DRAM) in one CUDA graph,
   median over replays, per layer; at TP=1 and TP=2 per-rank shapes of Llama-3.1-8B.
Prints a table last; writes $OUT/fused_mlp.json when OUT is set.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_gemv_gpu import median_replay_us, rel_error  # noqa: E402

from pagedllm.layers import triton_gemv as tg  # noqa: E402
from pagedllm.layers.triton_fused import gated_act_tile  # noqa: E402
from pagedllm.layers.triton_gemv_norm import skinny_add_rmsnorm_linear  # noqa: E402

EPS = 1e-5


@triton.jit
def _fused_mlp_kernel(h_ptr, r_ptr, nw_ptr, wgu_ptr, wdt_ptr, part_ptr, res_out_ptr,
                      H, I, rows_per_prog, eps,
                      BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program p: part[p] = sum over its rows i of silu(g_i) * u_i * down^T[i] (batch 1)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    h = tl.load(h_ptr + offs, mask=ok, other=0.0)
    r = tl.load(r_ptr + offs, mask=ok, other=0.0)
    s = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    if pid == 0:
        tl.store(res_out_ptr + offs, s, mask=ok)
    sf = s.to(tl.float32)
    scale = tl.rsqrt(tl.sum(sf * sf, axis=0) / H + eps)
    nw = tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x = (sf * nw).to(h.dtype).to(tl.float32)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    r0 = pid * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, I)
    offs_r = tl.arange(0, BLOCK_R)
    for start in tl.range(r0, r1, BLOCK_R, num_stages=NUM_STAGES):
        rows = start + offs_r
        m2 = (rows < r1)[:, None] & ok[None, :]
        row_offs = rows.to(tl.int64)[:, None] * H + offs[None, :]
        g_w = tl.load(wgu_ptr + row_offs, mask=m2, other=0.0)
        u_w = tl.load(wgu_ptr + I * H + row_offs, mask=m2, other=0.0)
        d_w = tl.load(wdt_ptr + row_offs, mask=m2, other=0.0)
        g = (tl.sum(g_w.to(tl.float32) * x[None, :], axis=1) * scale).to(h.dtype)
        u = (tl.sum(u_w.to(tl.float32) * x[None, :], axis=1) * scale).to(h.dtype)
        a = gated_act_tile(g, u, False).to(tl.float32)
        acc += tl.sum(a[:, None] * d_w.to(tl.float32), axis=0)
    tl.store(part_ptr + pid * H + offs, acc, mask=ok)


@triton.jit
def _reduce_partials_kernel(part_ptr, out_ptr, P, H, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[h-block] = sum over programs of part[:, h-block], rounded to out's dtype."""
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask = (offs_p < P)[:, None] & (offs_h < H)[None, :]
    t = tl.load(part_ptr + offs_p[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_h, tl.sum(t, axis=0).to(out_ptr.dtype.element_ty), mask=offs_h < H)


def fused_mlp(h: torch.Tensor, r: torch.Tensor, nw: torch.Tensor, wgu: torch.Tensor, wdt: torch.Tensor,
              cfg: dict[str, int], reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp output [1, H] (or the partials when not reduce), residual_out [1, H])."""
    hidden = h.shape[1]
    inter = wdt.shape[0]
    programs_wanted = cfg["per_sm"] * tg.num_sms(h.device)
    rows = triton.cdiv(inter, programs_wanted)
    programs = triton.cdiv(inter, rows)
    part = torch.empty((programs, hidden), dtype=torch.float32, device=h.device)
    res_out = torch.empty_like(h)
    _fused_mlp_kernel[(programs,)](h, r, nw, wgu, wdt, part, res_out, hidden, inter, rows, EPS,
                                   BLOCK_H=triton.next_power_of_2(hidden), BLOCK_R=cfg["block_r"],
                                   NUM_STAGES=cfg["stages"], num_warps=cfg["warps"], num_stages=cfg["stages"])
    if not reduce:
        return part, res_out
    out = torch.empty_like(h)
    block_h = 32
    _reduce_partials_kernel[(triton.cdiv(hidden, block_h),)](
        part, out, programs, hidden, BLOCK_P=triton.next_power_of_2(programs), BLOCK_H=block_h, num_warps=4)
    return out, res_out


def today_mlp(h: torch.Tensor, r: torch.Tensor, nw: torch.Tensor, wgu: torch.Tensor,
              wd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels a batch-1 MLP runs today (tuned configs)."""
    gate_up, res_out = skinny_add_rmsnorm_linear(h, r, nw, EPS, wgu)
    return tg.skinny_linear(gate_up, wd, act="silu"), res_out


def reference_mlp(h: torch.Tensor, r: torch.Tensor, nw: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """fp32 reference on the same values."""
    s = (h.float() + r.float())
    x = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * nw.float()
    gu = x @ wgu.float().t()
    inter = wd.shape[1]
    a = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    return a @ wd.float().t()


def make_layers(hidden: int, inter: int, layers: int, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Random weights per layer (scaled so activations stay O(1))."""
    out = []
    for _ in range(layers):
        wgu = (torch.randn(2 * inter, hidden, generator=gen, device=device) / hidden ** 0.5).to(dtype)
        wd = (torch.randn(hidden, inter, generator=gen, device=device) / inter ** 0.5).to(dtype)
        nw = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)
        out.append({"wgu": wgu, "wd": wd, "wdt": wd.t().contiguous(), "nw": nw})
    return out


def graph_us(step: Any, replays: int) -> float:
    """Median microseconds of one replay of the captured `step`."""
    step()
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_replay_us(graph, replays)


CONFIGS = [dict(per_sm=p, warps=w, block_r=b, stages=s)
           for p, w, b, s in itertools.product((1, 2), (4, 8), (1, 2, 4), (2, 3))]


def run_shape(name: str, hidden: int, inter: int, layers: int, replays: int, device: torch.device,
              configs: list[dict[str, int]]) -> list[dict[str, Any]]:
    """Check and time every config at one shape; rows for the table."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    ws = make_layers(hidden, inter, layers, dtype, device, gen)
    h = torch.randn(1, hidden, generator=gen, device=device).to(dtype)
    r = torch.randn(1, hidden, generator=gen, device=device).to(dtype)
    w0 = ws[0]
    ref = reference_mlp(h, r, w0["nw"], w0["wgu"], w0["wd"])
    today, _ = today_mlp(h, r, w0["nw"], w0["wgu"], w0["wd"])
    rows: list[dict[str, Any]] = []
    mb = sum(w["wgu"].numel() + w["wd"].numel() for w in ws) * 2 / layers / 1e6

    def chain(fn: Any) -> Any:
        def step() -> None:
            x, res = h, r
            for w in ws:
                x, res = fn(x, res, w)
        return step

    base_us = graph_us(chain(lambda x, res, w: today_mlp(x, res, w["nw"], w["wgu"], w["wd"])), replays) / layers
    rows.append(dict(shape=name, variant="today (2 kernels)", us=base_us, tbs=mb / base_us,
                     err=rel_error(today, ref)))
    for cfg in configs:
        label = "fused p{per_sm} w{warps} r{block_r} s{stages}".format(**cfg)
        try:
            out, _ = fused_mlp(h, r, w0["nw"], w0["wgu"], w0["wdt"], cfg)
            err = rel_error(out, ref)
            agree = rel_error(out, today)
            us = graph_us(chain(lambda x, res, w: fused_mlp(x, res, w["nw"], w["wgu"], w["wdt"], cfg)), replays) / layers
            us_nored = graph_us(chain(lambda x, res, w: (h, fused_mlp(x, res, w["nw"], w["wgu"], w["wdt"], cfg,
                                                                      reduce=False)[1])), replays) / layers
            rows.append(dict(shape=name, variant=label, us=us, us_no_reduce=us_nored,
                             tbs=mb / us, err=err, vs_today=agree, cfg=cfg))
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append(dict(shape=name, variant=label, error=f"{type(exc).__name__}: {exc}"[:200]))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    """Check, time, print a table, write JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a few configs only")
    args = parser.parse_args()
    device = torch.device("cuda")
    configs = CONFIGS[:4] if args.quick else CONFIGS
    rows = []
    for name, inter in (("TP=2 (I=7168)", 7168), ("TP=1 (I=14336)", 14336)):
        rows += run_shape(name, 4096, inter, args.layers, args.replays, device, configs)
        torch.cuda.empty_cache()
    print(f"\n{'shape':<16} {'variant':<26} {'us/layer':>9} {'no reduce':>9} {'TB/s':>6} {'err':>8} {'vs today':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['shape']:<16} {row['variant']:<26} {row['error']}")
            continue
        print(f"{row['shape']:<16} {row['variant']:<26} {row['us']:9.2f} {row.get('us_no_reduce', float('nan')):9.2f} "
              f"{row['tbs']:6.2f} {row['err']:8.1e} {row.get('vs_today', 0.0):8.1e}")
    if os.environ.get("OUT"):
        import json

        with open(os.path.join(os.environ["OUT"], "fused_mlp.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
