"""Time to first token at TP=1 and TP=N, with the prefill step replayed from a CUDA graph and
run eagerly (`cuda_graph_max_prefill_tokens=0`), plus optionally a profile of one prefill.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:benchmarks \
        python benchmarks/ttft_tp_gpu.py [--config llama-3.1-8b] [--tp 2] [--prompt-len 128]
                                         [--graph-max-tokens N]
                                         [--profile graph|eager] [--only graph|eager]

L1's prompt shape (128 random tokens, batch 1; --prompt-len 128,1024,2048 times each length),
dummy weights. For each variant and length: TTFT over 7 requests of distinct prompts (2 output
tokens each, after a warm-up request), min and median, and L1's TPOT (one request of 256
tokens; the decode graphs are the same in both variants, so TPOT is the control). With
--profile graph|eager, one request on that TP=N engine under the torch profiler (host ops and
kernels), summarised per rank (bench_tp_gpu.profile_l1). Writes $OUT/ttft_tp_p<prompt-len>.json.
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

from bench_tp_gpu import _engine, profile_l1  # noqa: E402


def ttft(engine, prompts: list[list[int]]) -> dict[str, float]:
    """Min and median TTFT (ms) over prompts[1:], after a warm-up on prompts[0].

    Distinct prompts: with one prompt repeated, the prefix cache would serve all but its last
    block and the runs would time a 16-token prefill."""
    from pagedllm.benchmarks.latency import measure_latency

    measure_latency(engine, [prompts[0]], 8)
    values = [measure_latency(engine, [prompt], 2)["ttft_s"] * 1e3 for prompt in prompts[1:]]
    return {"min_ms": min(values), "median_ms": statistics.median(values), "all_ms": values}


def l1_tpot(engine, prompt: list[int]) -> float:
    """L1's TPOT (ms): one request of 256 tokens."""
    from pagedllm.benchmarks.latency import measure_latency

    return measure_latency(engine, [prompt], 256)["tpot_median_s"] * 1e3


def main() -> None:
    """TTFT per variant, then the profile; a table last."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths, each timed")
    ap.add_argument("--no-tp1", action="store_true")
    ap.add_argument("--profile", choices=["graph", "eager"], default=None,
                    help="profile one request on the TP=N engine with prefill graphs / eager prefill")
    ap.add_argument("--only", choices=["graph", "eager"], default=None, help="run only that variant")
    ap.add_argument("--graph-max-tokens", type=int, default=None,
                    help="cuda_graph_max_prefill_tokens of the graph variants (default: the engine's)")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rng = random.Random(0)
    lengths = [int(n) for n in args.prompt_len.split(",")]
    prompts = {n: [[rng.randrange(100, 10000) for _ in range(n)] for _ in range(8)] for n in lengths}
    eager_prefill = {"cuda_graph_max_prefill_tokens": 0}
    sizes = [args.tp] if args.no_tp1 else [1, args.tp]
    graph = {} if args.graph_max_tokens is None else {"cuda_graph_max_prefill_tokens": args.graph_max_tokens}
    kinds = [("graph", "", graph), ("eager", "_prefill_eager", eager_prefill)]
    variants = [(f"tp{tp}{suffix}", tp, kw) for tp in sizes for kind, suffix, kw in kinds
                if args.only in (None, kind)]
    results: dict = {}
    if args.variant:  # one variant in this process (each runs in its own: memory is freed with it)
        name, tp, kw = next(v for v in variants if v[0] == args.variant)
        profiled = (args.profile is not None
                    and name == f"tp{args.tp}" + ("" if args.profile == "graph" else "_prefill_eager"))
        if profiled:  # read when the workers start
            os.environ["PAGEDLLM_TORCH_PROFILER_DIR"] = os.path.join(os.environ.get("OUT", "."), "traces")
        engine, startup = _engine(args.config, tp, max_model_len=4096, max_num_seqs=8, **kw)
        result = {"startup_s": startup, "ttft": {n: ttft(engine, prompts[n]) for n in lengths},
                  "tpot_ms": l1_tpot(engine, prompts[lengths[0]][0][:128])}
        if profiled:
            # One request of a fresh prompt, 2 tokens: its prefill step and one decode step.
            result["profile"] = profile_l1(engine, [rng.randrange(100, 10000) for _ in range(lengths[0])], 2,
                                           host_ops_top=25)
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
        with open(os.path.join(os.environ["OUT"], f"ttft_tp_p{'_'.join(map(str, lengths))}.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print("\n| variant | prompt | TTFT min | TTFT median | TPOT |\n| --- | --- | --- | --- | --- |")
    for name, _, _ in variants:
        r = results[name]
        if "error" in r:
            print(f"| {name} | | failed | | |")
            continue
        for n, t in r["ttft"].items():
            print(f"| {name} | {n} | {t['min_ms']:.1f} ms | {t['median_ms']:.1f} ms | {r['tpot_ms']:.3f} ms |")

if __name__ == "__main__":
    main()
