"""L1 with and without the all-reduce carried by the CUDA GEMVs (`PAGEDLLM_GEMV_ALL_REDUCE`).

Llama-3.1-8B dimensions (dummy bf16 weights), batch 1, a 128-token prompt, 256 output tokens:
TPOT of TP=1, of TP=2 with the all-reduces as kernels of their own ("tp2_plain") and of TP=2
with them riding on the GEMVs ("tp2_exchange"), all in one process on the same machine; the
greedy tokens of the two TP=2 variants are compared (the same bits are expected). Run from the
repository root on 2 GPUs:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \\
        python3 benchmarks/bench_gemv_all_reduce_gpu.py [tp2_exchange tp2_plain tp1]

Writes $OUT/exchange_l1.json. With PAGEDLLM_TORCH_PROFILER_DIR set, the TP=2 variants also
print both ranks' kernel timelines (bench_tp_gpu.profile_l1). The engine's workers are spawned
and import this file first: everything runs under the `__main__` guard.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
import bench_tp_gpu  # noqa: E402

from pagedllm.benchmarks.latency import measure_latency  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402

OUT = os.environ.get("OUT", ".")
PROFILE_ENV = "PAGEDLLM_TORCH_PROFILER_DIR"
# name -> (tensor-parallel size, PAGEDLLM_GEMV_ALL_REDUCE)
VARIANTS = {"tp1": (1, "0"), "tp2_plain": (2, "0"), "tp2_exchange": (2, "1")}
# TP=2 first: a TP=2 engine's rank 0 shares GPU 0 with this process.
DEFAULT_ORDER = ["tp2_exchange", "tp2_plain", "tp1"]


def greedy_tokens(engine: object, prompts: list[list[int]], max_tokens: int = 64) -> list[list[int]]:
    """Each prompt's greedy output ids, one request at a time (batch 1, the exchange's case)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens = []
    for i, prompt in enumerate(prompts):
        request_id = f"greedy-{i}-{time.monotonic_ns()}"
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        last: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step() or []:
                if out.request_id == request_id and out.finished:
                    last = list(out.outputs[0].token_ids)
        tokens.append(last)
    return tokens


def run_variant(name: str, prompts: list[list[int]]) -> dict:
    """Start the variant's engine, take its greedy tokens and L1 TPOT (middle of 3 runs), shut it down."""
    tp, switch = VARIANTS[name]
    os.environ["PAGEDLLM_GEMV_ALL_REDUCE"] = switch  # the spawned workers inherit it
    engine, startup = bench_tp_gpu._engine("llama-3.1-8b", tp, 1, max_model_len=4096, max_num_seqs=8)
    try:
        result = {"tokens": greedy_tokens(engine, prompts), "startup_s": startup}
        runs = [measure_latency(engine, [prompts[0]], 256) for _ in range(3)]
        result["tpot_ms"] = sorted(r["tpot_median_s"] for r in runs)[1] * 1e3
        if os.environ.get(PROFILE_ENV) and tp == 2:
            result["profile"] = bench_tp_gpu.profile_l1(engine, prompts[0], 48)
        return result
    finally:
        engine.shutdown()


def main() -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 10000) for _ in range(128)] for _ in range(2)]
    results: dict = {"copy_bandwidth_gbs": bench_tp_gpu.copy_bandwidth_gbs()}
    for name in sys.argv[1:] or DEFAULT_ORDER:
        start = time.perf_counter()
        try:
            results[name] = run_variant(name, prompts)
        except Exception as e:  # noqa: BLE001 - recorded, and the other variants still run
            traceback.print_exc()
            results[name] = {"error": repr(e)}
        shown = {k: v for k, v in results[name].items() if k not in ("tokens", "profile")}
        print(f"--- {name}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
        with open(os.path.join(OUT, "exchange_l1.json"), "w") as f:
            json.dump(results, f)
    exchange, plain = results.get("tp2_exchange", {}), results.get("tp2_plain", {})
    if "tokens" in exchange and "tokens" in plain:
        print("greedy tokens identical (exchange vs plain, TP=2):", exchange["tokens"] == plain["tokens"])
    if "tpot_ms" in results.get("tp1", {}):
        for name in ("tp2_exchange", "tp2_plain"):
            if "tpot_ms" in results.get(name, {}):
                print(f"TP=2 / TP=1 ({name}): {results[name]['tpot_ms'] / results['tp1']['tpot_ms']:.3f}")


if __name__ == "__main__":
    main()
