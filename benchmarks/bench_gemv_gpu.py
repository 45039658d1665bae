"""Check and time the skinny-GEMM Triton kernel (layers/triton_gemv.py) against cuBLAS (F.linear).

    PYTHONPATH=src python benchmarks/bench_gemv_gpu.py [--ms 1,2,4,8,16] [--no-lm-head] [--replays 20]

For the decode linear layers of Llama-3.1-8B (QKV, O, gate_up, down) and Qwen3-0.6B, plus both
LM heads (the kernel serves them too), and M (tokens) in --ms, in bf16:
1. Correctness: skinny_linear and F.linear against an fp32 reference (F.linear on the same bf16
   values in fp32, TF32 off): max |error| / max |reference|, PASS below 1e-2 (output rounding
   alone is ~4e-3). Then a CUDA-graph check: the captured kernel, replayed after x changed in
   place, equals an eager call bitwise.
2. Timing: each variant captured in a CUDA graph of back-to-back calls, each call on a different
   copy of the weight (copies add up to >= 256 MB, several times the L2), so every call streams
   its weight from DRAM as in a decode step; median over replays of graph time / calls. GB/s =
   weight bytes / that time. The first Triton call per (shape, M bucket) tunes the config; the
   choice and the tuning time are printed.
Prints a table last (and the per-token saving of the decode linears at M=1) and writes
everything to $OUT/gemv.json when OUT is set. Needs only torch, triton and this repo.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from pagedllm.layers import triton_gemv as tg  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention_gpu import attempt  # noqa: E402
from gpu_check import write_results  # noqa: E402

DEVICE = torch.device("cuda")
MAX_REL_ERROR = 1e-2
ROTATE_BYTES = 256 << 20  # weight copies per graph: several times the 50-60 MB L2
MIN_CALLS = 32  # calls captured per graph
# (model, layer, N, K, layers per model): the decode linears at tensor-parallel size 1.
SHAPES = [
    ("llama-3.1-8b", "qkv", 6144, 4096, 32),
    ("llama-3.1-8b", "o", 4096, 4096, 32),
    ("llama-3.1-8b", "gate_up", 28672, 4096, 32),
    ("llama-3.1-8b", "down", 4096, 14336, 32),
    ("qwen3-0.6b", "qkv", 4096, 1024, 28),
    ("qwen3-0.6b", "o", 1024, 2048, 28),
    ("qwen3-0.6b", "gate_up", 6144, 1024, 28),
    ("qwen3-0.6b", "down", 1024, 3072, 28),
]
LM_HEADS = [("llama-3.1-8b", "lm_head", 128256, 4096, 1), ("qwen3-0.6b", "lm_head", 151936, 1024, 1)]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def graph_time(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
               weights: list[torch.Tensor], replays: int) -> tuple[float, torch.cuda.CUDAGraph, torch.Tensor]:
    """(median microseconds per call, the graph, its last output) for fn over rotating weights."""
    order = [weights[i % len(weights)] for i in range(max(MIN_CALLS, len(weights)))]
    for w in weights:  # compile / tune and settle the allocator outside the capture
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x, w) for w in order]
    return median_replay_us(graph, replays) / len(order), graph, outs[-1]


def median_replay_us(graph: torch.cuda.CUDAGraph, replays: int, warm_ups: int = 1) -> float:
    """Median microseconds of one replay of `graph` over `replays` timed replays."""
    for _ in range(warm_ups):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_matches_eager(graph: torch.cuda.CUDAGraph, last_out: torch.Tensor, x: torch.Tensor,
                        last_weight: torch.Tensor) -> bool:
    """Refill x in place, replay, and compare the last captured call with an eager one."""
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    return torch.equal(last_out, tg.skinny_linear(x, last_weight))


def bench_shape(model: str, layer: str, n: int, k: int, ms: list[int], replays: int) -> list[dict[str, Any]]:
    """Check and time one weight shape at every M; returns one row per M."""
    weight_bytes = n * k * 2
    copies = max(1, math.ceil(ROTATE_BYTES / weight_bytes))
    gen = torch.Generator(device=DEVICE).manual_seed(n * 31 + k)
    weights = [torch.randn(n, k, device=DEVICE, generator=gen).mul_(0.02).to(torch.bfloat16) for _ in range(copies)]
    w_ref = weights[0].float()
    rows = []
    for m in ms:
        row: dict[str, Any] = {"model": model, "layer": layer, "n": n, "k": k, "m": m, "weight_mb": weight_bytes / 1e6}
        x = torch.randn(m, k, device=DEVICE, generator=gen).to(torch.bfloat16)
        key = (DEVICE.index or torch.cuda.current_device(), n, k, torch.bfloat16, tg.m_bucket(m))
        tuned_before = key in tg.tuned_configs()
        t0 = time.perf_counter()
        attempt("tune", lambda: tg.skinny_linear(x, weights[0]))
        torch.cuda.synchronize()
        if not tuned_before:
            row["tune_s"] = time.perf_counter() - t0
        config = tg.tuned_configs().get(key)
        row["config"] = str(config)

        def check() -> None:
            ref = F.linear(x.float(), w_ref)
            row["err_triton"] = rel_error(tg.skinny_linear(x, weights[0]), ref)
            row["err_cublas"] = rel_error(F.linear(x, weights[0]), ref)
            row["pass"] = row["err_triton"] < MAX_REL_ERROR

        attempt("check", check)
        cublas = attempt("cuBLAS timing", lambda: graph_time(F.linear, x, weights, replays))
        triton_run = attempt("Triton timing", lambda: graph_time(tg.skinny_linear, x, weights, replays))
        if cublas:
            row["cublas_us"] = cublas[0]
            row["cublas_gbps"] = weight_bytes / cublas[0] / 1e3
        if triton_run:
            row["triton_us"] = triton_run[0]
            row["triton_gbps"] = weight_bytes / triton_run[0] / 1e3
            order_last = weights[(max(MIN_CALLS, copies) - 1) % copies]
            row["graph_ok"] = attempt("graph check", lambda: graph_matches_eager(triton_run[1], triton_run[2], x,
                                                                                 order_last))
        if cublas and triton_run:
            row["speedup"] = cublas[0] / triton_run[0]
        del cublas, triton_run
        rows.append(row)
        status = "PASS" if row.get("pass") else "FAIL"
        nan = float("nan")
        print(f"  {model:>13} {layer:>7} [{n:>6}, {k:>5}] M={m:<2} {status} err {row.get('err_triton', nan):.1e}"
              f" (cuBLAS {row.get('err_cublas', nan):.1e})  cuBLAS {row.get('cublas_us', nan):7.1f} us"
              f"  Triton {row.get('triton_us', nan):7.1f} us  graph {'ok' if row.get('graph_ok') else 'MISMATCH'}"
              + (f"  tuned in {row['tune_s']:.1f} s: {config}" if "tune_s" in row else ""))
    del weights, w_ref
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """shape, M, cuBLAS and Triton microseconds and GB/s, speedup, check, config."""
    print(f"\n{'model':>13} {'layer':>7} {'N':>6} {'K':>5} {'M':>2} | {'cuBLAS us':>9} {'GB/s':>5} | "
          f"{'Triton us':>9} {'GB/s':>5} | {'speedup':>7} | check | config")
    nan = float("nan")
    for r in rows:
        print(f"{r['model']:>13} {r['layer']:>7} {r['n']:>6} {r['k']:>5} {r['m']:>2} | "
              f"{r.get('cublas_us', nan):9.1f} {r.get('cublas_gbps', nan):5.0f} | "
              f"{r.get('triton_us', nan):9.1f} {r.get('triton_gbps', nan):5.0f} | {r.get('speedup', nan):6.2f}x | "
              f"{'PASS' if r.get('pass') and r.get('graph_ok') else 'FAIL'}  | {r.get('config')}")


def decode_savings(rows: list[dict[str, Any]], layers: dict[str, int]) -> dict[str, float]:
    """Per model, microseconds per token saved by the kernel over the decoder linears at M=1."""
    saved: dict[str, float] = {}
    for r in rows:
        if r["m"] == 1 and r["layer"] != "lm_head" and "speedup" in r:
            delta = (r["cublas_us"] - r["triton_us"]) * layers[r["model"]]
            saved[r["model"]] = saved.get(r["model"], 0.0) + delta
    return saved


def main() -> None:
    """Run the checks and timings; print the table and write $OUT/gemv.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,2,4,8,16", help="token counts, comma separated (<= 16)")
    parser.add_argument("--replays", type=int, default=20, help="graph replays per variant (median reported)")
    parser.add_argument("--no-lm-head", action="store_true", help="skip the two LM head shapes")
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(DEVICE)
    results: dict[str, Any] = {
        "device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "rows": [],
    }
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    start = time.perf_counter()
    shapes = SHAPES + ([] if args.no_lm_head else LM_HEADS)
    for model, layer, n, k, _ in shapes:
        results["rows"] += attempt(f"{model} {layer}", lambda: bench_shape(model, layer, n, k, ms, args.replays)) or []
    results["tuned"] = {f"N={n} K={k} {str(dtype).removeprefix('torch.')} M-bucket={b}": str(c)
                        for (_, n, k, dtype, b), c in tg.tuned_configs().items()}
    layers = {model: count for model, _, _, _, count in SHAPES}
    results["saved_us_per_token_m1"] = saved = decode_savings(results["rows"], layers)
    results["wall_s"] = time.perf_counter() - start

    print("\nconfigs chosen by the tuner (N, K, dtype, M bucket):")
    for name, config in results["tuned"].items():
        print(f"  {name}: {config}")
    print_table(results["rows"])
    for model, us in saved.items():
        print(f"{model}: decoder linears at M=1 save {us:.0f} us per token over cuBLAS ({layers[model]} layers)")
    failures = [r for r in results["rows"] if not (r.get("pass") and r.get("graph_ok"))]
    print(f"{'ALL PASS' if not failures else f'{len(failures)} FAILED'}; {results['wall_s']:.0f} s")
    write_results(results, "gemv.json")


if __name__ == "__main__":
    main()
