"""Per-step device time of a decode trace by kind of kernel, and each kernel launch shape's mean.

    python benchmarks/trace_breakdown.py trace_rank0_*.json.gz [trace_rank1_*.json.gz ...]

For traces written by `LLM.start_profile()` / `stop_profile()` over decode steps (best with
PAGEDLLM_TORCH_PROFILER_DEVICE_ONLY=1, so the host keeps its speed). Steps are the intervals
between consecutive cudaGraphLaunch calls (the first and last few are dropped); each kernel is
put in a category by its name. Prints, per trace: the median launch-to-launch interval and
device-busy time, microseconds per step of each category, and the mean duration of every
(kernel, grid) pair that adds up to at least 2 ms over the trace -- which GEMM shape costs what.
"""

from __future__ import annotations

import argparse
import collections
import statistics

from trace_summary import GPU_CATEGORIES, load_trace

# (category, substrings of the kernel name), first match wins
CATEGORIES = [
    ("all-reduce", ("all_reduce", "AllReduce")),
    ("other collectives", ("nccl",)),
    ("GEMM (add + RMSNorm folded)", ("_norm_gemm",)),
    ("GEMM", ("skinny_gemm", "split_k_reduce", "nvjet", "gemm", "gemv", "splitK")),
    ("attention", ("attention", "reduce_splits", "rotary", "reshape_and_cache")),
]


def category(name: str) -> str:
    """The category of a kernel name ("other" when none matches)."""
    for label, needles in CATEGORIES:
        if any(needle in name for needle in needles):
            return label
    return "other"


def breakdown(path: str, skip: int = 5) -> dict:
    """Per-step figures of one trace (see the module docstring)."""
    events = load_trace(path)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES),
                     key=lambda e: e["ts"])
    launches = sorted(e["ts"] for e in events if e.get("name") == "cudaGraphLaunch")
    bounds = list(zip(launches[skip:-2], launches[skip + 1:-1]))
    per_category: collections.Counter = collections.Counter()
    spans, busy = [], []
    for start, end in bounds:
        step = [k for k in kernels if start <= k["ts"] < end]
        spans.append(end - start)
        busy.append(sum(k["dur"] for k in step))
        for k in step:
            per_category[category(k["name"])] += k["dur"]
    shapes: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for k in kernels:
        if k.get("cat") == "kernel":
            shapes[(k["name"][:48], str(k.get("args", {}).get("grid")))].append(k["dur"])
    steps = max(1, len(bounds))
    return {
        "steps": len(bounds),
        "step_us": statistics.median(spans) if spans else 0.0,
        "busy_us": statistics.median(busy) if busy else 0.0,
        "us_per_step": {label: total / steps for label, total in per_category.most_common()},
        "kernels": sorted(({"kernel": name, "grid": grid, "count": len(d), "mean_us": statistics.mean(d)}
                           for (name, grid), d in shapes.items() if sum(d) >= 2000),
                          key=lambda r: -r["count"] * r["mean_us"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+")
    args = ap.parse_args()
    for path in args.traces:
        result = breakdown(path)
        print(f"{path}: {result['steps']} steps, {result['step_us']:.0f} us launch to launch, "
              f"{result['busy_us']:.0f} us busy")
        for label, us in result["us_per_step"].items():
            print(f"  {label:30s} {us:8.1f} us per step")
        for row in result["kernels"]:
            print(f"    {row['kernel']:48s} grid {row['grid']:14s} x{row['count']:<6d} {row['mean_us']:7.2f} us")


if __name__ == "__main__":
    main()
