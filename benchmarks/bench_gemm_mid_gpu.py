"""Check and time the mid-sized GEMM Triton kernel (layers/triton_gemm.py) against cuBLAS at 32-256 tokens.

    PYTHONPATH=src python benchmarks/bench_gemm_mid_gpu.py [--ms 32,64,128,192,256] [--max-configs 25]
        [--replays 10] [--repeats 5]

For the decoder linears of Qwen3-0.6B (QKV, O, gate_up, down) and M (tokens) in --ms, in bf16:
1. Correctness: every candidate of `candidate_configs` against an fp32 reference (F.linear on
   the same bf16 values in fp32, TF32 off): max |error| / max |reference| must be < 1e-2, and
   two eager calls must agree bitwise. A failing (or crashing) config is reported, never timed.
2. Timing, as in a decode step: the model has 28 layers with different weights, so each variant
   is captured in a CUDA graph of 28 calls, one per weight copy (28 copies, several times the
   L2); the graph is replayed --replays times between two events; microseconds per GEMM is the
   median over --repeats such runs. Variants: cuBLAS as F.linear does it by default, with
   preferred_blas_library "cublaslt" and "cublas" (the default restored after), and every
   candidate that passed. The captured Triton output must equal an eager call (graph check).
3. The whole layer: a graph of 28 x (QKV, O, gate_up, down) calls with cuBLAS, with the best
   Triton config per shape, and with the faster of the two per shape (what a tuner would keep):
   microseconds per 28-layer step and the saving over cuBLAS at each M.
Prints a table last and writes everything to $OUT/gemm_mid.json (. when OUT is unset).
Needs only torch, triton and this repo. `--dry-run` runs the same code on CPU under
TRITON_INTERPRET=1 on shapes scaled down 8x with wall-clock timing (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # before triton is imported: the kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from pagedllm.layers import triton_gemm as tgm  # noqa: E402

MAX_REL_ERROR = 1e-2
LAYERS = 28
# (layer, N, K): Qwen3-0.6B's decoder linears at tensor-parallel size 1 (hidden 1024,
# 16 query + 8 KV heads of 128, intermediate 3072).
SHAPES = [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072)]
BLAS_LIBRARIES = ("cublaslt", "cublas")
_SLEEP_CYCLES = 1_000_000  # ~0.5 ms of GPU spin: the host enqueues the replays meanwhile


def attempt(label: str, fn: Callable[[], Any], notes: list[str]) -> Any:
    """fn(), or None after printing and noting the error (the run goes on)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark keeps going past a broken variant
        note = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"  [FAILED] {note}")
        traceback.print_exc(limit=2)
        notes.append(note)
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):  # a sticky CUDA error: later variants report it too
                torch.cuda.synchronize()
        return None


@contextlib.contextmanager
def blas_library(name: str) -> Iterator[None]:
    """Run the body with torch's preferred BLAS library set to `name`, then restore the previous one."""
    previous = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(name)
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def time_calls(calls: list[Callable[[], torch.Tensor]], replays: int, repeats: int
               ) -> tuple[float, list[torch.Tensor]]:
    """(median microseconds per call, the calls' outputs) of `calls` run in order in one CUDA graph.

    The calls run once eagerly first (compiles, allocator warm-up), outside the capture.
    """
    outs = [call() for call in calls]
    if DRY_RUN:  # CPU: wall clock of eager calls
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            outs = [call() for call in calls]
            times.append((time.perf_counter() - start) * 1e6 / len(calls))
        return statistics.median(times), outs
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(_SLEEP_CYCLES)  # so the events time the GPU, not the host's enqueueing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    return statistics.median(times), outs


def rotating_calls(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   weights: list[torch.Tensor]) -> list[Callable[[], torch.Tensor]]:
    """fn(x, w) for each weight copy in turn: one decode step's worth of one linear."""
    return [lambda w=w: fn(x, w) for w in weights]


def triton_fn(config: tgm.GemmConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel with a fixed config."""
    return lambda x, w: tgm.mid_gemm(x, w, config=config)


def bench_case(layer: str, n: int, k: int, m: int, weights: list[torch.Tensor], x: torch.Tensor,
               args: argparse.Namespace, sms: int) -> tuple[dict[str, Any], tgm.GemmConfig | None]:
    """Check and time cuBLAS and every Triton candidate for one (shape, M): (row, best config)."""
    row: dict[str, Any] = {"layer": layer, "n": n, "k": k, "m": m, "notes": [], "candidates": []}
    notes = row["notes"]
    ref = F.linear(x.float(), weights[0].float())
    row["err_cublas"] = rel_error(F.linear(x, weights[0]), ref)
    timed = attempt("cuBLAS", lambda: time_calls(rotating_calls(F.linear, x, weights), args.replays,
                                                  args.repeats), notes)
    if timed:
        row["cublas_us"] = timed[0]
    for lib in BLAS_LIBRARIES:
        def run_lib(lib: str = lib) -> float:
            with blas_library(lib):
                return time_calls(rotating_calls(F.linear, x, weights), args.replays, args.repeats)[0]

        us = attempt(lib, run_lib, notes)
        if us is not None:
            row[f"pref_{lib}_us"] = us
    configs = tgm.candidate_configs(n, k, m, x.dtype, sms)[:args.max_configs]
    for config in configs:
        cand: dict[str, Any] = {"config": str(config), **config.__dict__,
                                "programs": triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
                                * config.split_k}
        row["candidates"].append(cand)
        start = time.perf_counter()
        out = attempt(f"{layer} M={m} {config} (compile / run)",
                      lambda config=config: tgm.mid_gemm(x, weights[0], config=config), notes)
        if out is None:
            cand["error"] = "failed to compile or run"
            continue
        cand["first_call_s"] = time.perf_counter() - start
        cand["err"] = err = rel_error(out, ref)
        cand["reproducible"] = torch.equal(out, tgm.mid_gemm(x, weights[0], config=config))
        if not err < MAX_REL_ERROR or not cand["reproducible"]:
            cand["error"] = f"wrong result: rel error {err:.2e}, reproducible {cand['reproducible']}"
            notes.append(f"{layer} M={m} {config}: {cand['error']}")
            print(f"  [FAIL] {layer} M={m} {config}: {cand['error']}")
            continue
        timed = attempt(f"{layer} M={m} {config} (timing)",
                        lambda config=config: time_calls(rotating_calls(triton_fn(config), x, weights),
                                                         args.replays, args.repeats), notes)
        if timed:
            cand["us"] = timed[0]
            # The last replay's output of the first weight copy vs an eager call on the same inputs.
            cand["graph_ok"] = torch.equal(timed[1][0], tgm.mid_gemm(x, weights[0], config=config))
            if not cand["graph_ok"]:
                notes.append(f"{layer} M={m} {config}: graph output differs from eager")
    ok = [(c, config) for c, config in zip(row["candidates"], configs) if "us" in c and c.get("graph_ok")]
    best_config = None
    if ok:
        best, best_config = min(ok, key=lambda pair: pair[0]["us"])
        row["best_config"], row["triton_us"] = best["config"], best["us"]
        if "cublas_us" in row:
            row["speedup"] = row["cublas_us"] / best["us"]
        blas = [row[key] for key in ("cublas_us", *(f"pref_{lib}_us" for lib in BLAS_LIBRARIES)) if key in row]
        if blas:
            row["speedup_vs_best_blas"] = min(blas) / best["us"]
    nan = float("nan")
    failed = sum("error" in c for c in row["candidates"])
    print(f"  {layer:>7} [{n:>5}, {k:>5}] M={m:<3} cuBLAS {row.get('cublas_us', nan):6.1f} us"
          f" (lt {row.get('pref_cublaslt_us', nan):6.1f}, cublas {row.get('pref_cublas_us', nan):6.1f})"
          f"  Triton best {row.get('triton_us', nan):6.1f} us {row.get('best_config', '-')}"
          f"  x{row.get('speedup', nan):.2f}  ({len(row['candidates'])} configs, {failed} failed)")
    return row, best_config


def bench_layer_set(m: int, weights: dict[str, list[torch.Tensor]], xs: dict[str, torch.Tensor],
                    rows: dict[str, dict[str, Any]], best: dict[str, tgm.GemmConfig | None],
                    args: argparse.Namespace) -> dict[str, Any]:
    """One decode step's linears (every layer x the 4 shapes, in model order) with cuBLAS, the
    best Triton config per shape, and the faster of the two per shape."""
    result: dict[str, Any] = {"m": m, "notes": []}
    layers = list(weights)

    def fn_for(layer: str, use_triton: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        config = best[layer]
        return triton_fn(config) if use_triton and config is not None else F.linear

    variants = {"cublas": {layer: False for layer in layers}}
    if all(best.values()):
        variants["triton"] = {layer: True for layer in layers}
        variants["hybrid"] = {layer: rows[layer].get("triton_us", 1e9) < rows[layer].get("cublas_us", 1e9)
                              for layer in layers}
        result["hybrid_uses_triton_for"] = [layer for layer, on in variants["hybrid"].items() if on]
    n_layers = len(weights[layers[0]])
    for name, use in variants.items():
        calls = [lambda f=fn_for(layer, use[layer]), x=xs[layer], w=weights[layer][i]: f(x, w)
                 for i in range(n_layers) for layer in layers]
        timed = attempt(f"layer set {name} M={m}", lambda calls=calls: time_calls(calls, args.replays, args.repeats),
                        result["notes"])
        if timed:
            result[f"{name}_step_us"] = timed[0] * len(calls)  # per decode step (all layers)
    # The sum of the single-shape timings, for comparison with the measured step.
    for name, key in (("cublas", "cublas_us"), ("triton", "triton_us")):
        if all(key in row for row in rows.values()):
            result[f"{name}_sum_of_parts_us"] = sum(row[key] for row in rows.values()) * n_layers
    for name in ("triton", "hybrid"):
        if f"{name}_step_us" in result and "cublas_step_us" in result:
            result[f"{name}_saving_us"] = result["cublas_step_us"] - result[f"{name}_step_us"]
    return result


def print_tables(rows: list[dict[str, Any]], sets: list[dict[str, Any]], layers: int) -> None:
    """Per shape and M, then per M for the whole step."""
    nan = float("nan")
    print(f"\n{'layer':>7} {'N':>5} {'K':>5} {'M':>3} | {'cuBLAS':>7} {'lt':>7} {'cublas':>7} | "
          f"{'Triton':>7} | {'speedup':>7} {'vs best':>7} | best Triton config (us per GEMM)")
    for r in rows:
        print(f"{r['layer']:>7} {r['n']:>5} {r['k']:>5} {r['m']:>3} | {r.get('cublas_us', nan):7.2f} "
              f"{r.get('pref_cublaslt_us', nan):7.2f} {r.get('pref_cublas_us', nan):7.2f} | "
              f"{r.get('triton_us', nan):7.2f} | "
              f"{r.get('speedup', nan):6.2f}x {r.get('speedup_vs_best_blas', nan):6.2f}x | {r.get('best_config', '-')}")
    print(f"\n{'M':>3} | {'cuBLAS step':>11} | {'Triton step':>11} {'saving':>7} | {'hybrid step':>11} {'saving':>7}"
          f" | {'parts saving':>12} | us per {layers}-layer step (QKV + O + gate_up + down)")
    for s in sets:
        parts = s.get("cublas_sum_of_parts_us", nan) - s.get("triton_sum_of_parts_us", nan)
        print(f"{s['m']:>3} | {s.get('cublas_step_us', nan):11.1f} | {s.get('triton_step_us', nan):11.1f} "
              f"{s.get('triton_saving_us', nan):7.1f} | {s.get('hybrid_step_us', nan):11.1f} "
              f"{s.get('hybrid_saving_us', nan):7.1f} | {parts:12.1f} | hybrid: Triton for "
              f"{s.get('hybrid_uses_triton_for', '-')}")
    print("(saving: cuBLAS step - that step, measured; parts saving: from the single-shape timings x layers)")


def main() -> None:
    """Run the checks and timings; print the tables and write $OUT/gemm_mid.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="32,64,128,192,256", help="token counts, comma separated")
    parser.add_argument("--max-configs", type=int, default=25,
                        help="candidates timed per (shape, M), best-ranked first")
    parser.add_argument("--replays", type=int, default=10, help="graph replays between the two events")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke test: interpreter, shapes / 8")
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    shapes, layers = SHAPES, LAYERS
    if DRY_RUN:
        device, shapes, layers = torch.device("cpu"), [(name, n // 8, k // 8) for name, n, k in SHAPES], 2
        ms, args.replays, args.repeats = [17, 33], 1, 1
        sms, name = 132, "cpu (dry run)"
    else:
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        sms, name = props.multi_processor_count, props.name
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference
    results: dict[str, Any] = {
        "device": name, "sm_count": sms, "torch": torch.__version__, "triton": triton.__version__,
        "blas_default": str(torch.backends.cuda.preferred_blas_library()), "layers": layers,
        "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "rows": [], "layer_sets": [],
        "notes": [],
    }
    print(f"{name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"default BLAS {results['blas_default']}")
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {layer: [(torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                       for _ in range(layers)] for layer, n, k in shapes}
    for m in ms:
        xs = {layer: torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16) for layer, _, k in shapes}
        rows: dict[str, dict[str, Any]] = {}
        best: dict[str, tgm.GemmConfig | None] = {}
        for layer, n, k in shapes:
            case = attempt(f"{layer} M={m}", lambda: bench_case(layer, n, k, m, weights[layer], xs[layer], args, sms),
                           results["notes"])
            if case:
                rows[layer], best[layer] = case
                results["rows"].append(case[0])
        if len(rows) == len(shapes):
            layer_set = attempt(f"layer set M={m}", lambda: bench_layer_set(m, weights, xs, rows, best, args),
                                results["notes"])
            if layer_set:
                results["layer_sets"].append(layer_set)
                s = layer_set
                print(f"  step M={m}: cuBLAS {s.get('cublas_step_us', float('nan')):.1f} us, "
                      f"Triton {s.get('triton_step_us', float('nan')):.1f} us, "
                      f"hybrid {s.get('hybrid_step_us', float('nan')):.1f} us")
        print(f"  [{time.perf_counter() - start:.0f} s]")
    results["wall_s"] = time.perf_counter() - start
    failures = [note for row in results["rows"] for note in row["notes"]] + results["notes"]
    failures += [note for s in results["layer_sets"] for note in s["notes"]]
    if failures:
        print(f"\n{len(failures)} notes (failed or skipped variants):")
        for note in failures:
            print(f"  {note}")
    print_tables(results["rows"], results["layer_sets"], layers)
    print(f"{results['wall_s']:.0f} s")
    path = os.path.join(os.environ.get("OUT", "."), "gemm_mid.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
