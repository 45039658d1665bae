"""Can a decode GEMM hide the wait for its input behind its own weight stream? (one GPU)

    PYTHONPATH=src:benchmarks python benchmarks/bench_wait_hiding_gpu.py [--wait-ns 3000] [--replays 20]

At TP=2 every add + RMSNorm GEMM waits for an all-reduce (~3.7 us per call in the L1 step,
docs/benchmarks.md) during which DRAM idles. This experiment stands a spin of --wait-ns
nanoseconds in for the all-reduce (program 0 spins on %globaltimer, then writes the GEMM's input
x and publishes a flag) and times, on one rank's batch-1 GEMM shapes (M=1, bf16), CUDA graphs of
32 layers each of:
- sequential: a one-program spin-and-write kernel, then the tuned skinny GEMM (today's shape of
  the step: the all-reduce kernel, then the GEMM);
- fused, preload P: one launch; program 0 spins and writes x; every program first loads its
  first P weight tiles into registers, then waits for the flag (acquire), then runs the GEMM
  (those tiles come again from L2); P = 0 measures the saved kernel boundary alone;
- the GEMM alone (no wait): the floor.
If "fused, preload" comes close to "GEMM alone", the wait can be hidden and folding the one-shot
all-reduce into the GEMM that follows it would pay. Prints a table; JSON to $OUT/wait_hiding.json.
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
from bench_gemv_gpu import ROTATE_BYTES, median_replay_us  # noqa: E402
from gpu_check import write_results  # noqa: E402

DEVICE = torch.device("cuda")
LAYERS = 32


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _spin_and_write(src_ptr, x_ptr, K, wait_ns, BLOCK: tl.constexpr):
    start = _now()
    while _now() - start < wait_ns:
        pass
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(src_ptr + offs, mask=offs < K), mask=offs < K)


@triton.jit
def _spin_write_kernel(src_ptr, x_ptr, K, wait_ns, BLOCK: tl.constexpr):
    _spin_and_write(src_ptr, x_ptr, K, wait_ns, BLOCK)


@triton.jit
def _fused_kernel(src_ptr, x_ptr, w_ptr, out_ptr, flag_ptr, epoch_ptr, sink_ptr, N, K, wait_ns,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, PRELOAD: tl.constexpr):
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr + pid) + 1
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    if pid == 0:  # the stand-in for the all-reduce: wait, write x, publish
        _spin_and_write(src_ptr, x_ptr, K, wait_ns, 1024)
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr, epoch, sem="release", scope="gpu")
    if PRELOAD > 0:
        kk = tl.arange(0, PRELOAD * BLOCK_K)
        pre = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + kk[None, :], mask=n_ok[:, None], other=0.0)
    seen = tl.load(flag_ptr, volatile=True)
    while seen != epoch:
        seen = tl.load(flag_ptr, volatile=True)
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [seen], dtype=tl.int32,
                              is_pure=False, pack=1)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        x = tl.load(x_ptr + i * BLOCK_K + offs_k, cache_modifier=".cg")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)
    if PRELOAD > 0:
        keep = tl.sum(tl.sum(pre.to(tl.float32), axis=1), axis=0)
        if keep == 12345.678:  # never, for these weights: keeps the preload alive
            tl.store(sink_ptr, keep)
    tl.store(epoch_ptr + pid, epoch)


def graph_ms(fn, layers: int, replays: int) -> float:
    for _ in range(2):
        for i in range(layers):
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    return median_replay_us(graph, replays, warm_ups=2) / 1e3


def run_shape(name: str, n: int, k: int, wait_ns: int, replays: int) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(n)
    copies = max(LAYERS, math.ceil(ROTATE_BYTES / (n * k * 2)))
    weights = [torch.randn(n, k, device=DEVICE, generator=gen).mul_(0.02).to(torch.bfloat16) for _ in range(LAYERS)]
    del copies
    src = torch.randn(1, k, device=DEVICE, generator=gen).to(torch.bfloat16)
    x = torch.zeros(1, k, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(1, n, device=DEVICE, dtype=torch.bfloat16)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    sink = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    config = tg.get_config(src, weights[0])
    reference = tg.skinny_linear(src, weights[0]).float()

    def spin(i: int) -> None:
        _spin_write_kernel[(1,)](src, x, k, wait_ns, BLOCK=1024, num_warps=4)

    def sequential(i: int) -> None:
        spin(i)
        out.copy_(tg.skinny_linear(x, weights[i]))

    def alone(i: int) -> None:
        out.copy_(tg.skinny_linear(src, weights[i]))

    rows = []
    for label, fn in (("GEMM alone", alone), ("spin kernel alone", spin), ("sequential", sequential)):
        rows.append({"shape": name, "variant": label, "us_per_layer": graph_ms(fn, LAYERS, replays) * 1e3 / LAYERS})
    grid = triton.cdiv(n, 32)
    for preload, wait in ((0, 0), (0, wait_ns), (1, wait_ns), (2, wait_ns)):
        epochs = torch.zeros(grid, dtype=torch.int32, device=DEVICE)

        def fused(i: int, preload: int = preload, epochs: torch.Tensor = epochs, wait: int = wait) -> None:
            _fused_kernel[(grid,)](src, x, weights[i], out, flag, epochs, sink, n, k, wait,
                                   BLOCK_N=32, BLOCK_K=256, NUM_STAGES=4, PRELOAD=preload, num_warps=4, num_stages=4)

        x.zero_()
        fused(0)
        torch.cuda.synchronize()
        diff = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        rows.append({"shape": name, "variant": f"fused, preload {preload}" + ("" if wait else ", no wait"),
                     "rel_diff": diff,
                     "us_per_layer": graph_ms(fused, LAYERS, replays) * 1e3 / LAYERS})
    for row in rows:
        print(row, flush=True)
    rows.append({"shape": name, "tuned_config": str(config)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wait-ns", type=int, default=3000)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for name, n, k in (("gate_up TP=2", 14336, 4096), ("qkv TP=2", 3072, 4096), ("o TP=2", 4096, 2048)):
        rows += run_shape(name, n, k, args.wait_ns, args.replays)
    print(f"\n{torch.cuda.get_device_name(0)}, wait {args.wait_ns} ns: us per layer")
    for row in rows:
        if "us_per_layer" in row:
            print(f"| {row['shape']} | {row['variant']} | {row['us_per_layer']:.2f} | {row.get('rel_diff', '')} |")
    write_results({"device": torch.cuda.get_device_name(0), "wait_ns": args.wait_ns, "rows": rows}, "wait_hiding.json")


if __name__ == "__main__":
    main()
