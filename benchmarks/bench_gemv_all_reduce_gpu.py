# Experiment script (thirteenth session; see docs/parallelism.md): run from the repo root on 2 GPUs.
"""L1 at TP=1 and TP=2 with the all-reduce riding on the GEMVs (PAGEDLLM_GEMV_ALL_REDUCE=1) and
without; greedy tokens of the two TP=2 variants compared (the same bits are expected).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \
        python3 benchmarks/bench_gemv_all_reduce_gpu.py     # 2 GPUs; writes $OUT/exchange_l1.json
"""
import json, os, sys, time
sys.path.insert(0, "benchmarks")
import bench_tp_gpu as b  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.benchmarks.latency import measure_latency  # noqa: E402
import random  # noqa: E402

OUT = os.environ.get("OUT", ".")
PROFILE_ENV = "PAGEDLLM_TORCH_PROFILER_DIR"  # set it (e.g. $OUT/traces) for kernel timelines at TP=2
res = {}
rng = random.Random(5)
prompts = [[rng.randrange(100, 10000) for _ in range(128)] for _ in range(2)]


def greedy(engine, n=64):
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    toks = []
    for i, p in enumerate(prompts):
        rid = f"g{i}-{time.monotonic_ns()}"
        engine.add_request(rid, {"prompt_token_ids": p}, params)
        last = None
        while engine.has_unfinished_requests():
            for out in engine.step() or []:
                if out.request_id == rid and out.finished:
                    last = list(out.outputs[0].token_ids)
        toks.append(last)
    return toks


def run(name, tp, env):
    os.environ["PAGEDLLM_GEMV_ALL_REDUCE"] = env
    t0 = time.perf_counter()
    try:
        engine, startup = b._engine("llama-3.1-8b", tp, 1, max_model_len=4096, max_num_seqs=8)
        toks = greedy(engine)
        lat = [measure_latency(engine, [p], 256) for p in ([prompts[0]] * 3)]
        tpot = sorted(r["tpot_median_s"] for r in lat)[1] * 1e3
        res[name] = {"tpot_ms": tpot, "startup_s": startup, "tokens": toks}
        if os.environ.get(PROFILE_ENV) and tp == 2:  # kernel timelines of both ranks (bench_tp_gpu.py)
            res[name]["profile"] = b.profile_l1(engine, prompts[0], 48)
        engine.shutdown()
    except Exception as e:  # noqa: BLE001
        import traceback; traceback.print_exc()
        res[name] = {"error": repr(e)}
    print(f"--- {name}: {({k: v for k, v in res[name].items() if k != 'tokens'})} ({time.perf_counter() - t0:.0f} s)", flush=True)
    json.dump(res, open(os.path.join(OUT, "exchange_l1.json"), "w"))


if __name__ == "__main__":  # the TP=2 workers are spawned: they import this file
    res["bw"] = b.copy_bandwidth_gbs()
    # Order from the command line (default: TP=2 without the switch first, cold, then TP=1, then TP=2
    # with it). The one run that started TP=2 cold (thirteenth session) failed at its first graph
    # capture with the switch on and off alike; graphs are now captured in thread-local mode.
    VARIANTS = {"tp1": (1, "0"), "tp2_plain": (2, "0"), "tp2_exchange": (2, "1")}
    for name in sys.argv[1:] or ["tp2_plain", "tp1", "tp2_exchange"]:
        run(name, *VARIANTS[name])
    a, c = res.get("tp2_exchange", {}), res.get("tp2_plain", {})
    if "tokens" in a and "tokens" in c:
        print("tokens identical (exchange vs plain, TP=2):", a["tokens"] == c["tokens"])
    if "tpot_ms" in res.get("tp1", {}):
        for k in ("tp2_exchange", "tp2_plain"):
            if "tpot_ms" in res.get(k, {}):
                print(f"ratio {k}: {res[k]['tpot_ms'] / res['tp1']['tpot_ms']:.3f}")
