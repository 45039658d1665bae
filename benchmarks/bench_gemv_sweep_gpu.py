"""Sweep skinny-GEMM configs on the decode GEMMs of one rank, next to what the tuner picks.

    PYTHONPATH=src python benchmarks/bench_gemv_sweep_gpu.py [--tp 2] [--replays 20]

Llama-3.1-8B's batch-1 decode GEMMs per rank at TP=1 or 2, bf16, each as the engine runs it: O
(plain), down (gated SiLU input), QKV and gate_up (add + RMSNorm folded). Every config of SWEEP
(with split-K 1 and 2 for the plain and gated kernels; the norm kernel has no split) and the
tuner's pick are timed in a CUDA graph over rotating weight copies (each call streams its weight
from DRAM), as `bench_gemv_gpu.py` does. Prints per shape the tuner's pick and the best three;
writes $OUT/gemv_sweep_tp<N>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_gemv_gpu import ROTATE_BYTES, graph_time  # noqa: E402
from pagedllm.layers import triton_gemv as tg  # noqa: E402
from pagedllm.layers import triton_gemv_norm as tgn  # noqa: E402

DEVICE = torch.device("cuda")
# (block_n, block_k, use_dot, num_warps, num_stages)
SWEEP = [
    (8, 1024, False, 4, 4), (8, 1024, False, 4, 8), (8, 2048, False, 8, 4),
    (16, 512, False, 4, 6), (16, 512, False, 8, 8), (16, 1024, False, 8, 4), (16, 1024, False, 8, 6),
    (32, 256, False, 4, 4), (32, 256, False, 4, 8), (32, 512, False, 8, 4),
    (16, 256, True, 4, 5), (32, 256, True, 4, 4), (32, 256, True, 4, 6), (64, 128, True, 4, 4),
    (64, 256, True, 8, 3),
]


def shapes(tp: int) -> list[tuple[str, int, int, str]]:
    """(layer, N, K, kind) of one rank's decode GEMMs; kind: plain, gated or norm."""
    hidden, inter, q, kv = 4096, 14336, 4096, 1024
    return [("o", hidden, q // tp, "plain"), ("down", hidden, inter // tp, "gated"),
            ("qkv", (q + 2 * kv) // tp, hidden, "norm"), ("gate_up", 2 * inter // tp, hidden, "norm")]


def runner(kind: str, n: int, k: int, config: tg.GemvConfig | None):
    """fn(x, weight) running one GEMM of this kind with `config` (None: the tuner's pick)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if kind == "norm":
        residual = torch.randn(1, k, device=DEVICE, generator=gen).to(torch.bfloat16)
        norm_weight = torch.ones(k, device=DEVICE, dtype=torch.bfloat16)
        return lambda x, w: tgn.skinny_add_rmsnorm_linear(x, residual, norm_weight, 1e-5, w, config=config)[0]
    act = "silu" if kind == "gated" else None
    return lambda x, w: tg.skinny_linear(x, w, config=config, act=act)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    results = []
    for layer, n, k, kind in shapes(args.tp):
        weight_bytes = n * k * 2
        copies = max(2, math.ceil(ROTATE_BYTES / weight_bytes))
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        weights = [torch.randn(n, k, device=DEVICE, generator=gen).mul_(0.02).to(torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, 2 * k if kind == "gated" else k, device=DEVICE, generator=gen).to(torch.bfloat16)
        rows = []
        tuned_us = graph_time(runner(kind, n, k, None), x, weights, args.replays)[0]
        key = ("add_rmsnorm" if kind == "norm" else "silu" if kind == "gated" else "", DEVICE.index or 0, n, k,
               torch.bfloat16, 1)
        tuned = str(tg._tuned.get(key, "?"))
        for block_n, block_k, use_dot, warps, stages in SWEEP:
            for split in ((1,) if kind == "norm" else (1, 2)):
                config = tg.GemvConfig(block_n, block_k, split, use_dot, warps, stages)
                try:
                    us = graph_time(runner(kind, n, k, config), x, weights, args.replays)[0]
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported and skipped
                    print(f"{layer} {config}: failed ({type(exc).__name__})", flush=True)
                    continue
                rows.append({"config": str(config), "us": us, "gbps": weight_bytes / us / 1e3})
        rows.sort(key=lambda r: r["us"])
        result = {"layer": layer, "n": n, "k": k, "kind": kind, "mb": weight_bytes / 1e6, "tuned": tuned,
                  "tuned_us": tuned_us, "tuned_gbps": weight_bytes / tuned_us / 1e3, "sweep": rows}
        results.append(result)
        print(json.dumps({key: result[key] for key in result if key != "sweep"}), flush=True)
        for row in rows[:3]:
            print("   ", json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gemv_sweep_tp{args.tp}.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tp": args.tp, "shapes": results}, f, indent=1)
    print("\n| layer | MB | tuner's pick | us | GB/s | best swept | us | GB/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        best = r["sweep"][0] if r["sweep"] else {"config": "-", "us": float("nan"), "gbps": float("nan")}
        print(f"| {r['layer']} | {r['mb']:.1f} | {r['tuned']} | {r['tuned_us']:.2f} | {r['tuned_gbps']:.0f} | "
              f"{best['config']} | {best['us']:.2f} | {best['gbps']:.0f} |")


if __name__ == "__main__":
    main()
