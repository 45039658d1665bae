"""Summarise a torch-profiler Chrome trace (from `LLM.start_profile` / `stop_profile`): how busy
the GPU was, where its idle gaps fall, and which kernels take the time.

    python benchmarks/trace_summary.py trace_rank0_*.json [--top 15]

Used by the GPU scripts to say whether a step is GPU-bound (busy ~ window) or waits on the host
(gaps between kernels, named by the kernels on either side).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_trace(path: str) -> dict:
    """A Chrome trace as written by the torch profiler (gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _load(path: str) -> list[dict]:
    return load_trace(path)["traceEvents"]


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize_trace(path: str, top: int = 15, gap_us: float = 5.0) -> dict:
    """GPU busy time, idle gaps (> gap_us, by the kernels around them), top kernels, per-step figures.

    Per-step figures divide by the number of cudaGraphLaunch calls (decode steps replayed from a
    CUDA graph; eager steps are not counted), when there are any.
    """
    events = _load(path)
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    if not gpu:
        return {"path": path, "gpu_events": 0}
    graph_launches = sum(1 for e in events if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch")
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy = 0.0
    gaps: dict[str, list[float]] = defaultdict(list)
    cursor, previous = start, gpu[0]["name"]
    for event in gpu:
        if event["ts"] > cursor:
            gap = event["ts"] - cursor
            if gap > gap_us:
                gaps[f"{_short(previous, 40)} -> {_short(event['name'], 40)}"].append(gap)
        stop = event["ts"] + event["dur"]
        busy += max(0.0, stop - max(cursor, event["ts"]))
        if stop >= cursor:
            cursor, previous = stop, event["name"]
    by_kernel: dict[str, list[float]] = defaultdict(list)
    for event in gpu:
        by_kernel[_short(event["name"])].append(event["dur"])
    window = end - start
    steps = graph_launches or None
    result = {
        "path": path,
        "window_us": window,
        "gpu_busy_us": busy,
        "gpu_busy_fraction": busy / window,
        "graph_launches": graph_launches,
        "per_step_window_us": window / steps if steps else None,
        "per_step_busy_us": busy / steps if steps else None,
        "idle_gaps": [
            {"between": k, "count": len(v), "total_us": sum(v), "max_us": max(v)}
            for k, v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:top]
        ],
        "kernels": [
            {"name": k, "count": len(v), "total_us": sum(v), "mean_us": sum(v) / len(v)}
            for k, v in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
        ],
    }
    return result


def host_ops(path: str, top: int = 25) -> list[dict]:
    """The host-side events (torch ops, CUDA runtime calls, record_function scopes) with the most
    total time: where a host-bound stretch of steps spends it."""
    totals: dict[str, list[float]] = defaultdict(list)
    for event in _load(path):
        if event.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation", "cuda_driver") and "dur" in event:
            totals[f"{event['cat']}: {_short(event['name'], 60)}"].append(event["dur"])
    return [{"name": k, "count": len(v), "total_ms": round(sum(v) / 1e3, 3), "max_ms": round(max(v) / 1e3, 3)}
            for k, v in sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]]


def format_summary(summary: dict) -> str:
    """A few readable lines of `summarize_trace`'s result."""
    if not summary.get("gpu_events", 1):
        return f"{summary['path']}: no GPU events"
    lines = [f"{summary['path']}: window {summary['window_us'] / 1e3:.2f} ms, GPU busy "
             f"{summary['gpu_busy_fraction']:.1%}, graph launches {summary['graph_launches']}"]
    if summary["per_step_window_us"]:
        lines.append(f"  per graph launch: window {summary['per_step_window_us']:.0f} us, "
                     f"busy {summary['per_step_busy_us']:.0f} us")
    lines.append("  idle gaps (total us, count, max us):")
    lines += [f"    {g['total_us']:9.0f} {g['count']:5d} {g['max_us']:8.0f}  {g['between']}" for g in summary["idle_gaps"]]
    lines.append("  kernels (total us, count, mean us):")
    lines += [f"    {k['total_us']:9.0f} {k['count']:5d} {k['mean_us']:8.1f}  {k['name']}" for k in summary["kernels"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.traces:
        print(format_summary(summarize_trace(path, args.top)))


if __name__ == "__main__":
    main()
