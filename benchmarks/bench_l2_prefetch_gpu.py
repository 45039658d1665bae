"""Does prefetching the O projection's weight into L2 during decode attention pay? (sm_90+)

    PYTHONPATH=src:benchmarks python benchmarks/bench_l2_prefetch_gpu.py [--seq-len 300]

Llama-3.1-8B per-rank shapes at TP=1 (32 / 8 heads, O weight [4096, 4096]) and TP=2 (16 / 4,
[4096, 2048]), bf16, batch 1. A CUDA graph of 32 "layers" (own KV pool, QKV and O weight each,
so every weight comes from DRAM) is replayed; us per layer = median replay / 32. Variants:
attention alone (the folded decode kernel + split reduce), O GEMM alone, attention then O,
attention with `l2_prefetch(O weight)` on a side stream then O, and prefetch then O serially.
The O outputs of the prefetch variants are checked equal to the plain ones. Prints a table last
and writes $OUT/l2_prefetch.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from bench_decode_fold_gpu import HEAD_DIM, LAYERS, Layer, run_variant
from pagedllm.attention import triton_backend as tb
from pagedllm.layers import l2_prefetch as l2
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.triton_gemv import skinny_linear

DEVICE = torch.device("cuda")
VARIANTS = ["attention", "o", "attention, o", "attention | prefetch, o", "prefetch, o",
            "attention | load, o", "load, o"]


def step(name: str, layers: list[Layer], weights: list[torch.Tensor], rotary: RotaryEmbedding, splits: int,
         side: torch.cuda.Stream) -> list[torch.Tensor]:
    """One replay's work for variant `name`; returns the O outputs (none for attention alone)."""
    main = torch.cuda.current_stream()
    outs = []
    for layer, weight in zip(layers, weights):
        prefetch = "prefetch" in name or "load" in name
        fetch = l2.l2_prefetch if "prefetch" in name else l2.l2_load
        if prefetch and "|" in name:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                fetch(weight)
        elif prefetch:
            fetch(weight)
        if "attention" in name:
            run_variant("folded", layer, rotary, splits)
        if prefetch and "|" in name:
            main.wait_stream(side)
        if name != "attention":
            outs.append(skinny_linear(layer.out.view(1, -1), weight))
    return outs


def time_graph(fn, replays: int) -> tuple[float, list[torch.Tensor]]:
    """(us per layer, the graph's outputs after the last replay)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAYERS)
    return statistics.median(times), [o.clone() for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=300)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    rotary = RotaryEmbedding(HEAD_DIM, HEAD_DIM, 4096, {"rope_theta": 500000.0, "rope_type": "default"}).to(DEVICE)
    side = torch.cuda.Stream()
    rows = []
    for tp, (heads, kv_heads) in ((1, (32, 8)), (2, (16, 4))):
        splits = tb.choose_num_kv_splits(1, kv_heads, 4096, tb.num_sms(DEVICE))
        layers = [Layer(1, args.seq_len, heads, kv_heads, seed=i) for i in range(LAYERS)]
        gen = torch.Generator(device=DEVICE).manual_seed(tp)
        weights = [torch.randn(4096, heads * HEAD_DIM, generator=gen, device=DEVICE, dtype=torch.bfloat16) * 0.02
                   for _ in range(LAYERS)]
        row = {"tp": tp, "o_weight_mb": weights[0].numel() * 2 / 1e6, "supported": l2.supported(weights[0])}
        results = {}
        for name in VARIANTS:
            row[name], results[name] = time_graph(lambda: step(name, layers, weights, rotary, splits, side),
                                                  args.replays)
        # Same inputs each replay after the first (the folded kernel rewrites the same K/V slot).
        row["prefetch_outputs_equal"] = all(
            torch.equal(a, b) and torch.equal(a, c) for a, b, c in
            zip(results["attention, o"], results["attention | prefetch, o"], results["attention | load, o"]))
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "l2_prefetch.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "seq_len": args.seq_len, "rows": rows}, f, indent=1)
    print("\n| tp | O MB | " + " | ".join(VARIANTS) + " | (us per layer)")
    print("| --- " * (2 + len(VARIANTS)) + "|")
    for row in rows:
        print(f"| {row['tp']} | {row['o_weight_mb']:.1f} | " + " | ".join(f"{row[n]:.2f}" for n in VARIANTS) + " |")


if __name__ == "__main__":
    main()
