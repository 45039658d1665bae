"""L1 variants side by side, with per-CTA stamps of every CUDA GEMV of the decode graph.

Llama-3.1-8B dimensions (dummy bf16 weights), batch 1, a 128-token prompt, 256 output tokens.
Each variant is `name:tp:ENV=V,ENV=V` (the switches it sets; every switch listed in KNOBS is
cleared first; BENCH_DECODE_PARTITION_TOKENS=32 runs the decode attention in 32-token partitions), run one after the other in this process: its engine's greedy tokens (2 x 64,
compared with the first variant of the same TP size) and TPOT (middle of 3 runs). With
`GEMV_STAMPS=1` (the default) every `cuda_gemv.gemv` call also records, per CTA, when it
started, when its operand was in and when its rows were done (global timer, ns); after the run
each rank's last decode step is summarised per kind of GEMV, in us from the end of the previous
GEMV's last CTA (so the O projection's row includes the attention before it):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \\
        python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_wait:2:PAGEDLLM_GEMV_PULL_WAIT=1 tp1:1:

Writes $OUT/gemv_stamps.json. The stamps come from wrapping `cuda_gemv.gemv` and adding a
`gemv_stamps` method to the worker at import time: the engine's spawned workers import this file
first (as `__mp_main__`), so they carry the same wrappers; everything else runs under the
`__main__` guard. Stamping costs three global-timer reads and stores per CTA; set
`GEMV_STAMPS=0` for TPOT alone. `STAGE_STAMPS=1` also stamps each CTA's stages (when issued,
when warp 0 had the bytes, when its rows were done; and warp 0's SM clocks for its last row's
products, its warp sum and the rest) and prints them per kind of GEMV.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagedllm.attention import cuda_decode  # noqa: E402
from pagedllm.layers import cuda_gemv  # noqa: E402
from pagedllm.worker import worker as worker_module  # noqa: E402

# BENCH_DECODE_PARTITION_TOKENS, BENCH_CUDA_DECODE_*, BENCH_GEMV_AHEAD_PULL (this script's own):
# see _apply_bench_knobs.
KNOBS = ("PAGEDLLM_GEMV_PULL_WAIT", "PAGEDLLM_ATTENTION_PDL", "PAGEDLLM_GEMV_ALL_REDUCE", "PAGEDLLM_SHARDED_SAMPLING",
         "BENCH_DECODE_PARTITION_TOKENS", "PAGEDLLM_CUDA_DECODE_ATTENTION", "BENCH_CUDA_DECODE_WARPS",
         "BENCH_CUDA_DECODE_CLUSTER", "PAGEDLLM_ONE_SHOT_EMBEDDING", "PAGEDLLM_ONE_SHOT_ARGMAX",
         "PAGEDLLM_GEMV_LOCAL_HANDOFF", "BENCH_GEMV_AHEAD_PULL", "PAGEDLLM_GEMV_PULL_POLL")
_VARIANT_SWITCHES: dict[str, str | None] = {}  # switch -> its value before the last variant set it
_records: dict[tuple[int, str], dict[str, Any]] = {}  # (weight pointer, mode) -> call record
_unstamped_gemv = cuda_gemv.gemv


def _stamped_gemv(mode: str, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None,
                  *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """cuda_gemv.gemv with a per-(weight, mode) stamp buffer (graph replays overwrite it)."""
    if os.environ.get("GEMV_STAMPS", "1") == "1" and kwargs.get("stamps") is None:
        key = (weight.data_ptr(), mode)
        record = _records.get(key)
        if record is None:
            sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
            record = dict(order=len(_records), mode=mode, shape=list(weight.shape), push=kwargs.get("push") is not None,
                          pull=kwargs.get("pull") is not None,
                          stamps=torch.zeros(sms * 4, dtype=torch.int64, device=weight.device))
            if os.environ.get("STAGE_STAMPS", "0") == "1":
                record["stage_stamps"] = torch.zeros(sms * cuda_gemv.STAGE_STAMPS * cuda_gemv.STAGE_WORDS,
                                                     dtype=torch.int64, device=weight.device)
            _records[key] = record
        kwargs["stamps"] = record["stamps"]
        if "stage_stamps" in record:
            kwargs["stage_stamps"] = record["stage_stamps"]
    return _unstamped_gemv(mode, x, weight, out, *args, **kwargs)


def _stage_rows(stage: torch.Tensor, start: int, origin: int) -> list[dict[str, Any]]:
    """Per stage of one call (STAGE_STAMPS=1): how many CTAs had it (and how many found the end
    there), and the median CTA's issue, bytes-in and rows-done times in us from `origin`;
    entries older than the call's first CTA start are a longer replay's, left over."""
    rows = []
    for st in range(stage.shape[1]):
        r = stage[:, st]
        r = r[r[:, 0] >= start]
        if not len(r):
            break

        def med(t: torch.Tensor) -> float | None:
            t = t[t > 0]
            return round((float(t.double().median()) - origin) / 1e3, 2) if len(t) else None

        # warp 0's SM clocks where it had a row: products, sum, the rest, and cycles per ns
        worked = r[r[:, 5] > 0]

        def cycles(a: int, b: int) -> float | None:
            return float((worked[:, b] - worked[:, a]).double().median()) if len(worked) else None

        span_ns = (worked[:, 2] - worked[:, 1]).double().sum() if len(worked) else 0
        rows.append(dict(st=st, ctas=len(r), ends=int((r[:, 3] == -1).sum()), issued=med(r[:, 0]),
                         bytes_in=med(r[:, 1]), done=med(r[:, 2]), fma_clk=cycles(4, 5), sum_clk=cycles(5, 6),
                         tail_clk=cycles(6, 7), ghz=float((worked[:, 7] - worked[:, 4]).double().sum() / span_ns)
                         if span_ns > 0 else None))
    return rows


def _gemv_stamps(self: Any) -> list[dict[str, Any]]:
    """Worker method: every stamped call in first-call order, with its stamps [CTAs][4] (and,
    with STAGE_STAMPS=1, its stages summarised from the previous call's last CTA done)."""
    torch.cuda.synchronize()
    out = []
    previous = None  # the call before's stamps, on the host
    for r in sorted(_records.values(), key=lambda r: r["order"]):
        stamps = r["stamps"].view(-1, 4).cpu()
        call = dict({k: v for k, v in r.items() if k not in ("stamps", "stage_stamps")}, stamps=stamps.tolist())
        if "stage_stamps" in r and previous is not None:
            stages = r["stage_stamps"].view(-1, cuda_gemv.STAGE_STAMPS, cuda_gemv.STAGE_WORDS).cpu()
            call["stages"] = _stage_rows(stages, int(stamps[:, 0][stamps[:, 0] > 0].min()), int(previous[:, 2].max()))
        out.append(call)
        previous = stamps
    return out


def _all_reduce_path(self: Any) -> dict[str, Any]:
    """Worker method: whether this rank's all-reduces run on symmetric memory (else NCCL: at
    batch 1 ~1.1 ms a step more on 2 x H200) and how many row-parallel layers carry theirs on
    the GEMVs. A TPOT far off its usual figure is read against these first."""
    from pagedllm.distributed import get_custom_all_reduce

    model = self.model_runner.model
    return {"custom_all_reduce": get_custom_all_reduce() is not None,
            "gemv_exchange_layers": sum(getattr(m, "exchange", None) is not None for m in model.modules())}


cuda_gemv.gemv = _stamped_gemv
worker_module.Worker.gemv_stamps = _gemv_stamps  # type: ignore[attr-defined]
worker_module.Worker.all_reduce_path = _all_reduce_path  # type: ignore[attr-defined]


def _apply_bench_knobs() -> None:
    """The decode partitions of BENCH_DECODE_PARTITION_TOKENS, the CUDA decode kernel's warps per
    CTA (BENCH_CUDA_DECODE_WARPS) and largest cluster (BENCH_CUDA_DECODE_CLUSTER), the CUDA
    GEMV's stages ahead of a pulled operand (BENCH_GEMV_AHEAD_PULL); unset: the engine's."""
    from pagedllm.attention import triton_backend

    value = os.environ.get("BENCH_DECODE_PARTITION_TOKENS")
    triton_backend.DECODE_PARTITION_TOKENS = int(value) if value else None
    cuda_decode.WARPS = int(os.environ.get("BENCH_CUDA_DECODE_WARPS") or _ENGINE_DEFAULTS[0])
    cuda_decode.MAX_CLUSTER = int(os.environ.get("BENCH_CUDA_DECODE_CLUSTER") or _ENGINE_DEFAULTS[1])
    cuda_gemv.AHEAD_PULL = int(os.environ.get("BENCH_GEMV_AHEAD_PULL") or _ENGINE_DEFAULTS[2])


_ENGINE_DEFAULTS = (cuda_decode.WARPS, cuda_decode.MAX_CLUSTER, cuda_gemv.AHEAD_PULL)
_apply_bench_knobs()  # in the spawned workers: they import this file with the variant's environment


def relative_rows(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each call's CTA start (earliest, median), operand in (median, latest) and rows done
    (median, latest), in us from the previous call's last CTA done."""
    rows = []
    for j in range(1, len(calls)):
        before, call = calls[j - 1], calls[j]
        origin = max(s[2] for s in before["stamps"] if s[2])
        start, operand, done = ([sorted(s[i] - origin for s in call["stamps"]) for i in range(3)])
        mid = len(start) // 2
        rows.append(dict(j=j, mode=call["mode"], shape=call["shape"], pull=call["pull"], push=call["push"],
                         start_min=start[0] / 1e3, start_med=start[mid] / 1e3, operand_med=operand[mid] / 1e3,
                         operand_max=operand[-1] / 1e3, done_med=done[mid] / 1e3, done_max=done[-1] / 1e3))
    return rows


def gemv_span_us(calls: list[dict[str, Any]]) -> float:
    """From the first GEMV CTA's start to the last one's rows done, in us: the GPU time of one
    decode step's GEMVs and what runs between them (every replay overwrites every call's
    stamps, so all are from the last step). Far below TPOT, the step waited elsewhere (the host,
    sampling)."""
    starts = [s[0] for call in calls for s in call["stamps"] if s[0]]
    dones = [s[2] for call in calls for s in call["stamps"] if s[2]]
    return (max(dones) - min(starts)) / 1e3


def _kind(call: dict[str, Any]) -> tuple:
    """A GEMV's kind, as the summaries group them: mode, shape, pulled, pushed."""
    return call["mode"], tuple(call["shape"]), call["pull"], call["push"]


def summary(rows: list[dict[str, Any]], first_layer: int = 4, last_layer: int = 27) -> list[str]:
    """One line per kind of GEMV (mode, shape, pull, push): the mean over the middle layers."""
    kinds: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if 4 * first_layer + 1 <= row["j"] <= 4 * last_layer + 2:
            kinds.setdefault(_kind(row), []).append(row)
    fields = ("start_min", "start_med", "operand_med", "operand_max", "done_med", "done_max")
    return [f"{kind}: n={len(rs)} " + " ".join(f"{f}={statistics.mean(r[f] for r in rs):.2f}" for f in fields)
            for kind, rs in kinds.items()]


def stage_summary(calls: list[dict[str, Any]], first_layer: int = 4, last_layer: int = 27) -> list[str]:
    """With STAGE_STAMPS=1, per kind of GEMV and stage: CTAs, ends, and the mean over the middle
    layers of the median CTA's issued / bytes in / rows done (us from the previous GEMV's end)."""
    kinds: dict[tuple, dict[int, list[dict[str, Any]]]] = {}
    for j, call in enumerate(calls):
        if call.get("stages") and 4 * first_layer <= j <= 4 * last_layer + 3:
            kind = kinds.setdefault(_kind(call), {})
            for row in call["stages"]:
                kind.setdefault(row["st"], []).append(row)
    lines = []
    for kind, stages in kinds.items():
        parts = []
        for st, rows in sorted(stages.items()):
            def mean(f: str) -> str:
                vals = [r[f] for r in rows if r[f] is not None]
                return f"{statistics.mean(vals):.2f}" if vals else "-"
            parts.append(f"{st}:{statistics.mean(r['ctas'] for r in rows):.0f}/{statistics.mean(r['ends'] for r in rows):.0f}"
                         f" {mean('issued')}/{mean('bytes_in')}/{mean('done')}"
                         f" clk {mean('fma_clk')}/{mean('sum_clk')}/{mean('tail_clk')} @{mean('ghz')}")
        lines.append(f"{kind} stages (CTAs/ends issued/in/done): " + "  ".join(parts))
    return lines


def run_variant(spec: str, prompts: list[list[int]]) -> tuple[str, dict[str, Any]]:
    """Start the variant's engine, take its tokens, TPOT and stamps, shut it down."""
    import bench_tp_gpu
    from bench_gemv_all_reduce_gpu import greedy_tokens

    from pagedllm.benchmarks.latency import measure_latency

    name, tp, switches = spec.split(":")
    # Every switch the last variant set goes back to its value before it, listed in KNOBS or not
    # (a switch left over once made later variants run another's kernels); KNOBS start unset.
    for key, before in _VARIANT_SWITCHES.items():
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    _VARIANT_SWITCHES.clear()
    for knob in KNOBS:
        os.environ.pop(knob, None)
    for pair in filter(None, switches.split(",")):
        key, value = pair.split("=")
        _VARIANT_SWITCHES.setdefault(key, os.environ.get(key))
        os.environ[key] = value  # the spawned workers inherit them
    _records.clear()
    _apply_bench_knobs()  # this process serves TP=1
    engine, startup = bench_tp_gpu._engine("llama-3.1-8b", int(tp), 1, max_model_len=4096, max_num_seqs=8)
    try:
        result: dict[str, Any] = {"startup_s": startup, "tokens": greedy_tokens(engine, prompts),
                                  "all_reduce": engine.engine_core.executor.collective_rpc("all_reduce_path")}
        runs = [measure_latency(engine, [prompts[0]], 256) for _ in range(3)]
        result["tpot_ms"] = sorted(r["tpot_median_s"] for r in runs)[1] * 1e3
        if os.environ.get("GEMV_STAMPS", "1") == "1":
            dumps = engine.engine_core.executor.collective_rpc("gemv_stamps")
            result["rows"] = [relative_rows(calls) for calls in dumps]
            result["stages"] = [[c.get("stages") for c in calls] for calls in dumps]
            result["gemv_span_us"] = [gemv_span_us(calls) for calls in dumps]
            for rank, rows in enumerate(result["rows"]):
                print(f"[{name} rank {rank}] GEMVs of the last step: {result['gemv_span_us'][rank]:.0f} us")
                for line in summary(rows):
                    print("   ", line)
                for line in stage_summary(dumps[rank]):
                    print("   ", line)
        return name, result
    finally:
        engine.shutdown()


def main() -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 10000) for _ in range(128)] for _ in range(2)]
    results: dict[str, dict[str, Any]] = {}
    # TP=2 first: a TP=2 engine's rank 0 shares GPU 0 with this process.
    for spec in sys.argv[1:] or ["tp2:2:", "tp2_wait:2:PAGEDLLM_GEMV_PULL_WAIT=1", "tp1:1:"]:
        start = time.perf_counter()
        name = spec.split(":")[0]
        try:
            name, results[name] = run_variant(spec, prompts)
        except Exception as e:  # noqa: BLE001 - recorded, and the other variants still run
            traceback.print_exc()
            results[name] = {"error": repr(e)}
        print(f"--- {name}: TPOT {results[name].get('tpot_ms')} ms, all-reduce per rank "
              f"{results[name].get('all_reduce')} ({time.perf_counter() - start:.0f} s)", flush=True)
        with open(os.path.join(os.environ.get("OUT", "."), "gemv_stamps.json"), "w") as f:
            json.dump(results, f)
    names = [n for n in results if "tokens" in results[n]]
    for n in names:
        first = next(m for m in names if m[:3] == n[:3])
        print(f"{n:24s} TPOT {results[n]['tpot_ms']:.3f} ms, tokens == {first}'s: {results[n]['tokens'] == results[first]['tokens']}")


if __name__ == "__main__":
    main()
