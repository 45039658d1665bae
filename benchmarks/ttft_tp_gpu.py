"""Time to first token at TP=1 and TP=N, with the prefill step replayed from a CUDA graph and
run eagerly (`cuda_graph_max_prefill_tokens=0`), plus optionally a profile of one prefill.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:benchmarks \
        python benchmarks/ttft_tp_gpu.py [--config llama-3.1-8b] [--tp 2] [--prompt-len 128] [--profile]

L1's prompt (128 random tokens, batch 1), dummy weights. For each variant: TTFT over 7 requests
(2 output tokens each, after a warm-up request), min and median, and L1's TPOT (one request of
256 tokens; the decode graphs are the same in both variants, so TPOT is the control). With
--profile, one request on the eager-prefill TP=N engine under the torch profiler (host ops and
kernels), summarised per rank (trace_summary). Writes $OUT/ttft_tp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_tp_gpu import _engine  # noqa: E402


def ttft(engine, prompt: list[int], runs: int = 7) -> dict[str, float]:
    """Min and median TTFT (ms) over `runs` requests, after one warm-up; then L1's TPOT."""
    from pagedllm.benchmarks.latency import measure_latency

    measure_latency(engine, [prompt], 8)
    values = [measure_latency(engine, [prompt], 2)["ttft_s"] * 1e3 for _ in range(runs)]
    tpot = measure_latency(engine, [prompt], 256)["tpot_median_s"] * 1e3
    return {"min_ms": min(values), "median_ms": statistics.median(values), "all_ms": values, "tpot_ms": tpot}


def profile_prefill(engine, prompt: list[int]) -> dict:
    """One request under the torch profiler: each rank's longest host ops and kernels."""
    from pagedllm.benchmarks.latency import measure_latency
    from trace_summary import format_summary, host_ops, summarize_trace

    engine.start_profile()
    measure_latency(engine, [prompt], 2)
    paths = engine.stop_profile()
    out = {}
    for rank, path in enumerate(paths):
        summary = summarize_trace(path, top=20)
        ops = host_ops(path, top=25)
        print(f"--- rank {rank}\n{format_summary(summary)}", flush=True)
        for op in ops:
            print(f"  host {op}", flush=True)
        out[f"rank{rank}"] = {"summary": summary, "host_ops": ops}
    return out


def main() -> None:
    """TTFT per variant, then the profile; a table last."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--no-tp1", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rng = random.Random(0)
    prompt = [rng.randrange(100, 10000) for _ in range(args.prompt_len)]
    eager_prefill = {"cuda_graph_max_prefill_tokens": 0}
    sizes = [args.tp] if args.no_tp1 else [1, args.tp]
    variants = [(f"tp{tp}{suffix}", tp, kw) for tp in sizes
                for suffix, kw in (("", {}), ("_prefill_eager", eager_prefill))]
    results: dict = {}
    if args.variant:  # one variant in this process (each runs in its own: memory is freed with it)
        name, tp, kw = next(v for v in variants if v[0] == args.variant)
        profiled = name == f"tp{args.tp}_prefill_eager" and args.profile
        if profiled:  # read when the workers start
            os.environ["PAGEDLLM_TORCH_PROFILER_DIR"] = os.path.join(os.environ.get("OUT", "."), "traces")
        engine, startup = _engine(args.config, tp, max_model_len=4096, max_num_seqs=8, **kw)
        result = {"startup_s": startup, **ttft(engine, prompt)}
        if profiled:
            result["profile"] = profile_prefill(engine, prompt)
        engine.shutdown()
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return
    for name, _, _ in variants:
        cmd = [sys.executable, __file__, "--variant", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
        results[name] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-2000:]}
        print(name, {k: v for k, v in results[name].items() if k != "profile"}, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "ttft_tp.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print("\n| variant | TTFT min | TTFT median | TPOT |\n| --- | --- | --- | --- |")
    for name, _, _ in variants:
        r = results[name]
        if "error" in r:
            print(f"| {name} | failed | | |")
            continue
        print(f"| {name} | {r['min_ms']:.1f} ms | {r['median_ms']:.1f} ms | {r['tpot_ms']:.3f} ms |")


if __name__ == "__main__":
    main()
