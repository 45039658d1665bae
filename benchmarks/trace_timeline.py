"""One decode step of several ranks' profiler traces on one clock: host stages, graph launches,
kernels outside the graph and GPU idle gaps, so a late rank and what delays it stand out.

    python benchmarks/trace_timeline.py trace_rank0_*.json trace_rank1_*.json [--step 20]
"""

from __future__ import annotations

import argparse

from trace_summary import GPU_CATEGORIES, load_trace

# Kernels replayed inside the decode graph (not listed one by one).
_IN_GRAPH = ("norm_gemm", "skinny_gemm", "all_reduce", "decode_attention", "reduce_splits", "rotary",
             "reshape_and_cache", "memcpy32", "rms_norm", "gated_act", "nvjet", "splitKreduce")


def step_timeline(paths: list[str], step: int, gap_us: float = 10.0) -> list[str]:
    """Lines describing graph launch `step` .. `step + 1` of every trace, times in us from rank 0's launch."""
    lines: list[str] = []
    origin = None
    for rank, path in enumerate(paths):
        trace = load_trace(path)
        base = int(trace.get("baseTimeNanoseconds", 0)) / 1e3  # us
        events = trace["traceEvents"]
        launches = sorted((e for e in events if e.get("name") == "cudaGraphLaunch"), key=lambda e: e["ts"])
        if len(launches) <= step + 1:
            lines.append(f"rank {rank}: only {len(launches)} graph launches")
            continue
        lo, hi = launches[step]["ts"], launches[step + 1]["ts"] + 200
        if origin is None:
            origin = base + lo
        rows = []
        for e in events:
            if "dur" not in e or not lo - 200 <= e["ts"] <= hi:
                continue
            name, cat = e["name"], e.get("cat")
            if cat == "user_annotation" or name == "cudaGraphLaunch":
                rows.append((e["ts"], f"host tid {e.get('tid')}: {name} ({e['dur']:.0f} us)"))
            elif cat in GPU_CATEGORIES and not any(k in name for k in _IN_GRAPH):
                rows.append((e["ts"], f"  gpu: {name[:60]} ({e['dur']:.1f} us)"))
        gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e and lo - 200 <= e["ts"] <= hi),
                     key=lambda e: e["ts"])
        end = None
        for e in gpu:
            if end is not None and e["ts"] - end > gap_us:
                rows.append((end, f"  gpu idle {e['ts'] - end:.0f} us, then {e['name'][:40]}"))
            end = max(end or 0.0, e["ts"] + e["dur"])
        lines.append(f"--- rank {rank} (step {step}: {len(gpu)} GPU events)")
        for ts, text in sorted(rows):
            lines.append(f"{base + ts - origin:9.0f}  {text}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--step", type=int, default=20)
    args = parser.parse_args()
    print("\n".join(step_timeline(args.traces, args.step)))


if __name__ == "__main__":
    main()
