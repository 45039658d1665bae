"""Do decode GEMMs lose their tail to uneven SMs? Work-stealing skinny GEMM against the tuned one.

    PYTHONPATH=src:benchmarks python benchmarks/bench_gemv_dynamic_gpu.py [--tp 1,2] [--replays 20]

At batch 1 one rank's small decode GEMMs stream well below the card's bandwidth (docs/
parallelism.md), and neither other tile shapes nor row-balanced grids (every program the same
rows) helped: if SMs pull bandwidth unevenly, a static split ends when the slowest SM does. Here
a persistent grid (programs_per_sm x SMs programs) takes chunks of CHUNK_N output rows from a
global ticket counter (an int64 atomic add per chunk, the next ticket fetched while the current
chunk streams), so fast SMs take more chunks. The counter is never reset: every launch draws
exactly n_chunks + G tickets (each program draws until one comes back past the end), and each
program keeps the launch's first ticket in its own slot, so CUDA-graph replays need no memset.

M = 1, bf16, the elementwise (FMA) inner product. Shapes: Llama-3.1-8B's O, down, QKV, gate_up
at one rank's TP size, as plain GEMMs. Each variant is timed in a CUDA graph over rotating weight
copies (every call streams from DRAM) with `bench_gemv_gpu.graph_time`, after a check against
the tuned kernel's output. Prints a table; JSON to $OUT/gemv_dynamic.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from pagedllm.layers import triton_gemv as tg  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_gemv_gpu import ROTATE_BYTES, graph_time  # noqa: E402
from gpu_check import write_results  # noqa: E402

DEVICE = torch.device("cuda")


@triton.jit
def _dynamic_gemv_kernel(x_ptr, w_ptr, out_ptr, counter_ptr, base_ptr, N, K,
                         CHUNK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    num = tl.num_programs(0)
    n_chunks = tl.cdiv(N, CHUNK_N)
    base = tl.load(base_ptr + pid)
    offs_k = tl.arange(0, BLOCK_K)
    chunk = tl.atomic_add(counter_ptr, 1) - base
    while chunk < n_chunks:
        nxt = tl.atomic_add(counter_ptr, 1) - base  # in flight while this chunk streams
        offs_n = chunk * CHUNK_N + tl.arange(0, CHUNK_N)
        n_ok = offs_n < N
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        acc = tl.zeros((CHUNK_N, BLOCK_K), dtype=tl.float32)
        for i in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptr + i * BLOCK_K + offs_k)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        tl.store(out_ptr + offs_n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)
        chunk = nxt
    tl.store(base_ptr + pid, base + n_chunks + num)


class Dynamic:
    """The work-stealing launch with its ticket counter and per-program first tickets."""

    def __init__(self, sms: int, per_sm: int, chunk_n: int, block_k: int, stages: int, warps: int) -> None:
        self.grid = sms * per_sm
        self.chunk_n, self.block_k, self.stages, self.warps = chunk_n, block_k, stages, warps
        self.counter = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        self.base = torch.zeros(self.grid, dtype=torch.int64, device=DEVICE)
        self.name = f"dynamic {per_sm}/SM CHUNK_N={chunk_n} BLOCK_K={block_k} stages={stages} warps={warps}"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        if k % self.block_k:
            raise ValueError("K must be a multiple of BLOCK_K here")
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
        _dynamic_gemv_kernel[(self.grid,)](x, weight, out, self.counter, self.base, n, k,
                                           CHUNK_N=self.chunk_n, BLOCK_K=self.block_k, NUM_STAGES=self.stages,
                                           num_warps=self.warps, num_stages=self.stages)
        return out


def shapes(tp: int) -> list[tuple[str, int, int]]:
    hidden, inter, q, kv = 4096, 14336, 4096, 1024
    return [("o", hidden, q // tp), ("down", hidden, inter // tp), ("qkv", (q + 2 * kv) // tp, hidden),
            ("gate_up", 2 * inter // tp, hidden)]


VARIANTS = [  # (programs per SM, CHUNK_N, BLOCK_K, stages, warps)
    (2, 16, 512, 4, 8), (3, 16, 512, 4, 4), (4, 8, 512, 4, 4), (4, 16, 256, 4, 4), (2, 32, 256, 4, 8),
    (3, 8, 1024, 3, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        for layer, n, k in shapes(tp):
            mb = n * k * 2 / 1e6
            copies = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
            gen = torch.Generator(device=DEVICE).manual_seed(n + k)
            weights = [torch.randn(n, k, device=DEVICE, generator=gen).mul_(0.02).to(torch.bfloat16)
                       for _ in range(copies)]
            x = torch.randn(1, k, device=DEVICE, generator=gen).to(torch.bfloat16)
            tuned_us = graph_time(lambda a, w: tg.skinny_linear(a, w), x, weights, args.replays)[0]
            reference = tg.skinny_linear(x, weights[0]).float()
            row = {"tp": tp, "layer": layer, "mb": mb, "tuned_us": tuned_us, "variants": {}}
            for per_sm, chunk_n, block_k, stages, warps in VARIANTS:
                fn = Dynamic(sms, per_sm, chunk_n, block_k, stages, warps)
                try:
                    error = ((fn(x, weights[0]).float() - reference).abs().max() / reference.abs().max()).item()
                    us = graph_time(fn, x, weights, args.replays)[0]
                    # the counter kept working through the graph's replays
                    after = ((fn(x, weights[0]).float() - reference).abs().max() / reference.abs().max()).item()
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"TP={tp} {layer} {fn.name}: failed: {exc}", flush=True)
                    continue
                row["variants"][fn.name] = {"us": us, "rel_diff": max(error, after)}
            best = min(row["variants"].items(), key=lambda kv: kv[1]["us"])
            row["best"] = best[0]
            print(f"TP={tp} {layer} {mb:.1f} MB: tuned {tuned_us:.2f} us ({mb / tuned_us:.2f} TB/s); best dynamic "
                  f"{best[1]['us']:.2f} us ({mb / best[1]['us']:.2f} TB/s, diff {best[1]['rel_diff']:.1e}) {best[0]}",
                  flush=True)
            rows.append(row)
            del weights
    print(f"\n{torch.cuda.get_device_name(0)}: us per call (M=1, bf16)")
    names = [Dynamic(sms, *v).name for v in VARIANTS]
    print("| TP | layer | MB | tuned | " + " | ".join(f"v{i}" for i in range(len(names))) + " |")
    for row in rows:
        cells = [f"{row['variants'][nm]['us']:.2f}" if nm in row["variants"] else "-" for nm in names]
        print(f"| {row['tp']} | {row['layer']} | {row['mb']:.1f} | {row['tuned_us']:.2f} | " + " | ".join(cells) + " |")
    for i, nm in enumerate(names):
        print(f"v{i}: {nm}")
    write_results({"device": torch.cuda.get_device_name(0), "rows": rows}, "gemv_dynamic.json")


if __name__ == "__main__":
    main()
