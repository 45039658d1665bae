"""The CUDA bulk-copy GEMV (layers/cuda_gemv.py) against the Triton skinny GEMMs, one H200/H100.

    PYTHONPATH=src python benchmarks/bench_cuda_gemv_gpu.py

1. Correctness: every Llama-3.1-8B decode GEMV shape at TP=1/2/4 in its form (QKV and gate_up
   with add + RMSNorm, O plain, down with the SiLU-gated input) against an fp32 reference of the
   same roundings and against the Triton kernel; three repeat launches bitwise equal.
2. Timing (CUDA graphs, 32 layers of distinct weights, median of 20 replays): each shape alone
   in a chain of 32, and the layer chain QKV -> O -> gate_up -> down, optionally with stand-ins
   for attention (8 us) and the two all-reduces (3 us each, TP=2) as torch.cuda._sleep spins.
   Variants of the CUDA kernel: ticketed tail fraction, producer pacing, PDL on / off.
Writes $OUT/cuda_gemv.json. `--timeline`: one layer's per-CTA timeline instead.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "src")
from pagedllm.layers import cuda_gemv as cg  # noqa: E402
from pagedllm.layers.triton_gemv import skinny_linear  # noqa: E402
from pagedllm.layers.triton_gemv_norm import skinny_add_rmsnorm_linear  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_gemv_gpu import median_replay_us  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
t0 = time.time()
assert cg.available()
print(f"build {time.time() - t0:.1f} s", flush=True)
dev = torch.device("cuda")
EPS = 1e-5
H, I, NQ, NKV, D = 4096, 14336, 32, 8, 128
results = {"device": torch.cuda.get_device_name()}
CYCLES_PER_US = 1980  # torch.cuda._sleep spins clock cycles (SM clock ~1.98 GHz under load)


def shapes(tp):
    return dict(qkv=((NQ + 2 * NKV) * D // tp, H), o=(H, NQ * D // tp), gate_up=(2 * I // tp, H), down=(H, I // tp))


def check():
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for tp in (1, 2, 4):
        for name, (n, k) in shapes(tp).items():
            w = (torch.randn(n, k, device=dev, generator=g) * 0.02).bfloat16()
            bias = (torch.randn(n, device=dev, generator=g) * 0.1).bfloat16() if name == "qkv" else None
            out = torch.full((1, n), float("nan"), device=dev, dtype=torch.bfloat16)
            if name in ("qkv", "gate_up"):
                h = torch.randn(1, k, device=dev, generator=g).bfloat16()
                r = torch.randn(1, k, device=dev, generator=g).bfloat16()
                nw = (1 + 0.1 * torch.randn(k, device=dev, generator=g)).bfloat16()
                s = (h.float() + r.float()).bfloat16()
                xo = (s.float() * nw.float()).bfloat16()
                ref = (xo.float() @ w.float().t()) * torch.rsqrt(s.float().pow(2).mean() + EPS)
                tri, tri_res = skinny_add_rmsnorm_linear(h, r, nw, EPS, w, bias)
                res_out = torch.empty(1, k, device=dev, dtype=torch.bfloat16)
                reps = [cg.gemv("add_rmsnorm", h, w, out.clone(), bias, r, nw, EPS, res_out) for _ in range(3)]
            elif name == "down":
                x = torch.randn(1, 2 * k, device=dev, generator=g).bfloat16()
                xo = (F.silu(x[:, :k].float()).bfloat16().float() * x[:, k:].float()).bfloat16()
                ref = xo.float() @ w.float().t()
                tri = skinny_linear(x, w, act="silu")
                reps = [cg.gemv("silu", x, w, out.clone()) for _ in range(3)]
            else:
                x = torch.randn(1, k, device=dev, generator=g).bfloat16()
                ref = x.float() @ w.float().t()
                tri = skinny_linear(x, w)
                reps = [cg.gemv("plain", x, w, out.clone()) for _ in range(3)]
            if bias is not None:
                ref = ref + bias.float()
            torch.cuda.synchronize()
            o = reps[0]
            err = ((o.float() - ref).abs().max() / ref.abs().max()).item()
            err_tri = ((o.float() - tri.float()).abs().max() / ref.abs().max()).item()
            ok = err < 8e-3 and not o.isnan().any().item() and all(torch.equal(o, x2) for x2 in reps[1:])
            if name in ("qkv", "gate_up"):
                ok = ok and torch.equal(res_out, s) and torch.equal(res_out, tri_res)
            rows.append(dict(tp=tp, gemm=name, err_ref=err, err_triton=err_tri, ok=ok))
            if not ok:
                print("CHECK FAILED", rows[-1], flush=True)
    results["check"] = rows
    bad = [x for x in rows if not x["ok"]]
    print(f"check: {len(rows) - len(bad)}/{len(rows)} ok (repeat launches bitwise equal); max err vs fp32 "
          f"{max(x['err_ref'] for x in rows):.2e}, vs triton {max(x['err_triton'] for x in rows):.2e}", flush=True)
    return not bad


class Layers:
    def __init__(self, tp, n_layers=32):
        self.tp = tp
        self.sh = shapes(tp)
        self.w = [{k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.02 for k, (n, kk) in self.sh.items()}
                  for _ in range(n_layers)]
        self.nw = torch.ones(H, device=dev, dtype=torch.bfloat16)
        self.h = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
        self.r = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
        self.res = torch.empty(1, H, device=dev, dtype=torch.bfloat16)
        self.out = {k: torch.empty(1, n, device=dev, dtype=torch.bfloat16) for k, (n, kk) in self.sh.items()}
        self.attn_in = torch.randn(1, self.sh["o"][1], device=dev, dtype=torch.bfloat16)
        self.stamps = None

    def op(self, impl: str, name: str, lw: dict) -> None:
        """One GEMV of layer weights `lw` through `impl` ("triton" or "cuda")."""
        o = self.out
        st = None
        if self.stamps is not None:
            st = torch.zeros(132, 4, dtype=torch.int64, device=dev)
            self.stamps.append((name, st))
        if impl == "triton":
            if name in ("qkv", "gate_up"):
                skinny_add_rmsnorm_linear(self.h, self.r, self.nw, EPS, lw[name])
            elif name == "down":
                skinny_linear(o["gate_up"], lw[name], act="silu")
            else:
                skinny_linear(self.attn_in, lw[name])
        elif name in ("qkv", "gate_up"):
            cg.gemv("add_rmsnorm", self.h, lw[name], o[name], None, self.r, self.nw, EPS, self.res, stamps=st)
        elif name == "down":
            cg.gemv("silu", o["gate_up"], lw[name], o[name], stamps=st)
        else:
            cg.gemv("plain", self.attn_in, lw[name], o[name], stamps=st)

    def run_one(self, impl, name):
        for lw in self.w:
            self.op(impl, name, lw)

    def run_layers(self, impl, stand_ins):
        for lw in self.w:
            self.op(impl, "qkv", lw)
            if stand_ins:
                torch.cuda._sleep(8 * CYCLES_PER_US)
            self.op(impl, "o", lw)
            if stand_ins and self.tp > 1:
                torch.cuda._sleep(3 * CYCLES_PER_US)
            self.op(impl, "gate_up", lw)
            self.op(impl, "down", lw)
            if stand_ins and self.tp > 1:
                torch.cuda._sleep(3 * CYCLES_PER_US)


def time_graph(fn, reps=20):
    """Median ms of one replay of a CUDA graph of `fn` (run once eagerly first: tuning)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_replay_us(graph, reps, warm_ups=3) / 1e3


def timeline(L: "Layers") -> None:
    """One eager layer with the kernel's per-CTA global-timer stamps: when the CTAs started, had
    their operand, finished (us from the first start)."""
    L.stamps = []
    lw = L.w[0]
    for name in ("qkv", "o", "gate_up", "down"):
        L.op("cuda", name, lw)
    torch.cuda.synchronize()
    stamps, L.stamps = L.stamps, None
    t0 = min(int(t[:, 0].min()) for _, t in stamps)
    for name, t in stamps:
        t = (t.cpu() - t0).double() / 1000.0
        print(f"  {name:8s} start {t[:, 0].min():6.2f}/{t[:, 0].max():6.2f}  operand {t[:, 1].max():6.2f}  "
              f"end {t[:, 2].min():6.2f}/{t[:, 2].max():6.2f}")


VARIANTS = {"dyn.4 ahead2 pdl": (0.4, 2, True), "dyn.4 ahead2": (0.4, 2, False), "dyn.4 ahead0 pdl": (0.4, 0, True),
            "dyn0 ahead2 pdl": (0.0, 2, True), "dyn.2 ahead2 pdl": (0.2, 2, True)}


def set_variant(v):
    cg.DYNAMIC_FRACTION, cg.AHEAD, cg.PDL = VARIANTS[v]


def main():
    if "--timeline" in sys.argv:
        for tp in (1, 2):
            print(f"TP={tp} (us: start min/max, operand max, end min/max)")
            timeline(Layers(tp, n_layers=1))
        return
    results["check_ok"] = check()
    per, chains = [], []
    for tp in (1, 2):
        L = Layers(tp)
        for name, (n, k) in L.sh.items():
            row = {"tp": tp, "gemm": name, "triton": time_graph(lambda: L.run_one("triton", name))}
            for v in VARIANTS:
                set_variant(v)
                row[v] = time_graph(lambda: L.run_one("cuda", name))
            per.append(row)
            mb = n * k * 2 / 1e6
            print(f"TP={tp} {name:8s} ({mb:6.1f} MB) us: " + "  ".join(
                f"{k2} {v * 1000 / 32:6.2f}" for k2, v in row.items() if isinstance(v, float)), flush=True)
        for stand_ins in (False, True):
            row = {"tp": tp, "stand_ins": stand_ins, "triton": time_graph(lambda: L.run_layers("triton", stand_ins))}
            for v in VARIANTS:
                set_variant(v)
                row[v] = time_graph(lambda: L.run_layers("cuda", stand_ins))
            chains.append(row)
            print(f"TP={tp} layer chain, stand-ins {stand_ins}: us/layer " + "  ".join(
                f"{k2} {v * 1000 / 32:.2f}" for k2, v in row.items() if isinstance(v, float)), flush=True)
        del L
        torch.cuda.empty_cache()
    results["per_gemm_ms_per_32"] = per
    results["chains_ms_per_32"] = chains
    with open(os.path.join(OUT, "cuda_gemv.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
