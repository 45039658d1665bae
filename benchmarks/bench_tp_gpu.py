"""Tensor-parallel GPU run (issues 6 and 8): L1 / T1 at several TP sizes, greedy identity across
them, the all-reduce and control-path share of a step. One command per model:

    PYTHONPATH=src:. python benchmarks/bench_tp_gpu.py --tp 1,2            # 8B L1 + 0.6B T1 (issue 6)
    PYTHONPATH=src:. python benchmarks/bench_tp_gpu.py --tp 4 --l1-config llama-3.1-70b \
        --t1-config llama-3.1-70b --floor-gb 141.1                        # 70B (issue 8)

Prints a table last and writes JSON to $OUT. Needs only torch, triton and transformers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

# This tree's src comes first, whatever PYTHONPATH says: to time another commit, run that
# tree's copy of this script (the result records which package it imported).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import pagedllm  # noqa: E402
from pagedllm.benchmarks.throughput import t1_requests  # noqa: E402
from pagedllm.config import EngineArgs  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import record  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
RESULTS: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "num_gpus": torch.cuda.device_count(),
                 "pagedllm_path": os.path.dirname(os.path.abspath(pagedllm.__file__))}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth of GPU 0 (read + write bytes / time)."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    gbs = 2 * x.numel() * 10 / (time.perf_counter() - t0) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return gbs


def _engine(config: str, tp: int, pp: int = 1, **kw):
    from pagedllm.engine.llm_engine import LLMEngine

    args = EngineArgs(model=os.path.join(CONFIGS, config), load_format="dummy", skip_tokenizer_init=True,
                      tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(args)
    return engine, time.perf_counter() - t0


def control_path_us(engine, iters: int = 300) -> dict[str, float]:
    """Round trip of an empty step through the executor (pickle, pipes, workers, reply), in us."""
    from pagedllm.core.scheduler_output import SchedulerOutput

    executor = engine.engine_core.executor
    empty = SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=[], num_scheduled_tokens={},
                            total_num_scheduled_tokens=0)
    for _ in range(20):
        executor.execute_model(empty)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        executor.execute_model(empty)
        times.append(time.perf_counter() - t0)
    return {"median_us": statistics.median(times) * 1e6, "p90_us": sorted(times)[int(0.9 * iters)] * 1e6}


def host_breakdown(engine, prompt: list[int], output_len: int) -> dict[str, float]:
    """Mean microseconds per engine step in each part of the engine process's loop (L1 workload).

    `wait_result` is the time the engine waits for a launched step's tokens: near zero means the
    device finished before the host asked (the host path is the bound), near the step time the
    opposite. Parts are timed by wrapping the engine core's collaborators (instance attributes,
    removed afterwards).
    """
    from pagedllm.benchmarks.latency import measure_latency

    core = engine.engine_core
    totals: dict[str, float] = {}

    def timed(label: str, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0
        return call

    def launch(scheduler_output):
        future = send(scheduler_output)
        future.result = timed("wait_result", future.result)
        return future

    send = timed("send_step", core.executor.execute_model_async)
    patched = [(core.scheduler, "schedule", timed("schedule", core.scheduler.schedule)),
               (core.scheduler, "update_from_output", timed("update_from_output", core.scheduler.update_from_output)),
               (core.executor, "execute_model_async", launch),
               (engine.output_processor, "process_outputs",
                timed("process_outputs", engine.output_processor.process_outputs)),
               (engine, "step", timed("engine_step", engine.step))]
    for obj, name, fn in patched:
        setattr(obj, name, fn)
    try:
        result = measure_latency(engine, [prompt], output_len)
    finally:
        for obj, name, _ in patched:
            delattr(obj, name)
    return {"tpot_ms": result["tpot_median_s"] * 1e3,
            **{f"{k}_us_per_step": v / output_len * 1e6 for k, v in totals.items()}}


def profile_l1(engine, prompt: list[int], output_len: int, host_ops_top: int = 0) -> dict:
    """Torch-profiler traces of every rank over `output_len` L1 steps, summarised (trace_summary),
    with each rank's `host_ops_top` longest host ops when > 0."""
    from pagedllm.benchmarks.latency import measure_latency
    from trace_summary import format_summary, host_ops, summarize_trace

    engine.start_profile()
    measure_latency(engine, [prompt], output_len)
    paths = engine.stop_profile()
    from trace_timeline import step_timeline

    print("\n".join(step_timeline(paths, output_len // 2)), flush=True)
    summaries = {}
    for rank, path in enumerate(paths):
        summary = summarize_trace(path)
        print(format_summary(summary), flush=True)
        if host_ops_top:
            summary["host_ops"] = host_ops(path, top=host_ops_top)
            print("\n".join(f"  host {op}" for op in summary["host_ops"]), flush=True)
        summaries[f"rank{rank}"] = summary
        subprocess.run(["gzip", "-f", path], check=False)
    return summaries


def l1(config: str, tp: int, floor_gb: float, bandwidth: float, engine=None, profile: bool = False,
       pp: int = 1, **engine_kw) -> dict:
    from pagedllm.benchmarks.latency import measure_latency

    shared = engine is not None
    startup = 0.0
    if not shared:
        engine, startup = _engine(config, tp, pp, max_model_len=4096, max_num_seqs=8, **engine_kw)
    rng = random.Random(0)
    # A fresh prompt per run: a repeated one would hit the prefix cache, and TTFT would time a
    # 16-token prefill (the figures recorded before the eighth session did).
    prompts = [[[rng.randrange(100, 10000) for _ in range(128)]] for _ in range(4)]
    prompt = prompts[0]
    measure_latency(engine, prompt, 8)
    runs = [measure_latency(engine, p, 256) for p in prompts[1:]]
    tpot = sorted(r["tpot_median_s"] for r in runs)[1] * 1e3
    floor_ms = floor_gb / (tp * bandwidth) * 1e3
    res = {"startup_s": startup, "ttft_ms": min(r["ttft_s"] for r in runs) * 1e3, "tpot_ms": tpot,
           "floor_ms": floor_ms, "tpot_over_floor": tpot / floor_ms}
    if tp > 1:
        res["control_path"] = control_path_us(engine)
    if profile:
        res["host_breakdown"] = host_breakdown(engine, prompt[0], 128)
        res["profile"] = profile_l1(engine, prompt[0], 48)
    if not shared:
        engine.shutdown()
        del engine
        gc.collect()  # an in-process engine's cycles hold its weights and KV pool until collected
        torch.cuda.empty_cache()
    return res



def t1(config: str, tp: int, greedy_prompts: list[list[int]], greedy_tokens: int,
       l1_args: tuple | None = None, greedy_t1: bool = True, pp: int = 1, **engine_kw) -> tuple[dict, list]:
    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.throughput import bench_pagedllm

    t0 = time.perf_counter()
    llm = LLM(os.path.join(CONFIGS, config), load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384,
              **engine_kw)
    res = {"startup_s": time.perf_counter() - t0, "num_blocks": llm.llm_engine.config.cache_config.num_blocks}
    if l1_args is not None:  # L1 on this same engine (saves a second start of a large model)
        res["l1"] = l1(config, tp, *l1_args, engine=llm.llm_engine)
    reqs = t1_requests()
    executor = llm.llm_engine.engine_core.executor
    sent = (getattr(executor, "messages_sent", 0), getattr(executor, "bytes_sent", 0))
    # The first pass JIT-compiles the Triton kernel variants it meets (cold); the second is warm.
    runs = [bench_pagedllm(llm, reqs, 0.6) for _ in range(2)]
    if hasattr(executor, "bytes_sent"):
        res["control_bytes_per_step"] = (executor.bytes_sent - sent[1]) / max(executor.messages_sent - sent[0], 1)
    res["cold_output_tok_s"] = runs[0]["output_tok_s"]
    res.update({k: runs[1][k] for k in ("seconds", "output_tokens", "output_tok_s")})
    if greedy_t1:
        res["greedy_output_tok_s"] = bench_pagedllm(llm, reqs, 0.0)["output_tok_s"]
    params = SamplingParams(temperature=0.0, max_tokens=greedy_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in greedy_prompts], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    llm.shutdown()
    del llm, executor
    gc.collect()
    torch.cuda.empty_cache()
    return res, tokens


def all_reduce_graph(x: torch.Tensor, calls: int, warm_ups: int = 10) -> tuple[torch.cuda.CUDAGraph, bool]:
    """A CUDA graph of `calls` in-place all-reduces (the engine's routing) of a copy of x, and
    whether one replay gives what `calls` NCCL all-reduces of x give, bit for bit."""
    import torch.distributed as dist

    import pagedllm.distributed as pd

    y = x.clone()
    for _ in range(warm_ups):
        pd.tensor_model_parallel_all_reduce(y.copy_(x))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            pd.tensor_model_parallel_all_reduce(y)
    y.copy_(x)
    graph.replay()
    ref = x.clone()
    for _ in range(calls):
        dist.all_reduce(ref)
    return graph, bool(torch.equal(y, ref))


def _allreduce_worker(rank: int, world: int, port: int, hidden: int, batches: list[int], per_step: int, q) -> None:
    """Per batch size: a decode step's all-reduces in a CUDA graph, NCCL vs the custom one
    (symmetric memory), after checking the custom result equals NCCL's (eager and replayed)."""
    import torch.distributed as dist

    import pagedllm.distributed as pd

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    pd.init_distributed_environment(rank, world, f"tcp://127.0.0.1:{port}", device, custom_all_reduce=True)
    custom = pd._CUSTOM_ALL_REDUCE
    out: dict = {"custom_available": custom is not None}
    one_shot_limit = custom.one_shot_max_bytes if custom is not None else 0
    # custom = the default routing (one-shot Triton kernel up to its limit, then two-shot);
    # two_shot = torch's two-shot kernel for every size.
    variants = [("nccl", None, 0)] + ([("custom", custom, one_shot_limit), ("two_shot", custom, 0)] if custom else [])
    for batch in batches:
        x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(rank))
        for name, comm, limit in variants:
            pd._CUSTOM_ALL_REDUCE = comm
            if comm is not None:
                comm.one_shot_max_bytes = limit
                ref = x.clone()
                dist.all_reduce(ref)
                got = x.clone()
                pd.tensor_model_parallel_all_reduce(got)
                out[f"batch_{batch}_{name}_equals_nccl_eager"] = bool(torch.equal(got, ref))
            graph, equal = all_reduce_graph(x, per_step)
            if comm is not None:
                out[f"batch_{batch}_{name}_equals_nccl_graph"] = equal
            graph.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
            out[f"batch_{batch}_{name}_ms_per_step"] = (time.perf_counter() - t0) / 20 * 1e3
        if custom is not None:
            custom.one_shot_max_bytes = one_shot_limit
    pd._CUSTOM_ALL_REDUCE = custom
    if rank == 0:
        q.put(out)
    pd.destroy_distributed_environment()


def allreduce_ms_per_step(world: int, hidden: int, layers: int, batches: list[int]) -> dict:
    """Time of one decode step's all-reduces alone (2 per layer, bf16 [batch, hidden], in a CUDA graph)."""
    import torch.multiprocessing as mp

    from pagedllm.distributed import host_store

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = host_store()  # the ranks' rendezvous, served from here
    port = store.port
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, hidden, batches, 2 * layers, q))
             for r in range(world)]
    for p in procs:
        p.start()
    result = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result


def print_table(results: dict) -> None:
    """One row per result: a dict's scalar fields (floats to 3 places), or the value itself."""
    print("\n| run | value |\n| --- | --- |")
    for key, value in results.items():
        if isinstance(value, dict):
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items()
                     if not isinstance(v, (list, dict))}
            print(f"| {key} | {brief} |")
        else:
            print(f"| {key} | {value} |")


def _compare_tokens(base: list[list[int]], other: list[list[int]]) -> dict:
    """How many greedy completions are identical, and where the others first differ."""
    same = [a == b for a, b in zip(base, other)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(base, other)]
    return {"identical_requests": sum(same), "of": len(same),
            "first_divergence_positions": [d for d in first_diff if d is not None]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--l1-config", default="llama-3.1-8b")
    ap.add_argument("--t1-config", default="qwen3-0.6b")
    ap.add_argument("--floor-gb", type=float, default=16.06, help="weight bytes read per token (GB)")
    ap.add_argument("--skip-l1", action="store_true")
    ap.add_argument("--skip-t1", action="store_true")
    ap.add_argument("--skip-allreduce", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="L1: host-loop breakdown and torch-profiler traces of every rank (to $OUT/traces)")
    ap.add_argument("--shared-engine", action="store_true", help="L1 on the T1 engine (same config)")
    ap.add_argument("--greedy-t1", action="store_true", help="also time T1 with greedy sampling")
    ap.add_argument("--tokens-out", default=None, help="write the greedy tokens of each TP size here (JSON)")
    ap.add_argument("--compare-tokens", nargs=2, default=None, metavar=("A", "B"),
                    help="only compare two --tokens-out files and exit")
    args = ap.parse_args()
    if args.compare_tokens:
        a, b = (json.load(open(path)) for path in args.compare_tokens)
        compare = _compare_tokens(next(iter(a.values())), next(iter(b.values())))
        print(json.dumps(compare))
        return
    sizes = [int(x) for x in args.tp.split(",")]
    if args.profile:  # before any engine starts: worker processes inherit it
        os.environ["PAGEDLLM_TORCH_PROFILER_DIR"] = os.path.join(os.environ.get("OUT", "."), "traces")
    bandwidth = record(RESULTS, "copy_bandwidth_gbs", copy_bandwidth_gbs)
    rng = random.Random(1)
    greedy_prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(16, 512))] for _ in range(32)]
    tokens = {}
    for tp in sizes:
        if not args.skip_l1 and not args.shared_engine:
            record(RESULTS, f"l1_tp{tp}", l1, args.l1_config, tp, args.floor_gb, bandwidth, profile=args.profile)
        if not args.skip_t1:
            l1_args = (args.floor_gb, bandwidth) if args.shared_engine else None
            res = record(RESULTS, f"t1_tp{tp}", lambda: t1(args.t1_config, tp, greedy_prompts, 128, l1_args,
                                                   greedy_t1=args.greedy_t1))
            if isinstance(res, tuple):
                RESULTS[f"t1_tp{tp}"], tokens[tp] = res
    if args.tokens_out and tokens:
        with open(args.tokens_out, "w") as f:
            json.dump({str(tp): t for tp, t in tokens.items()}, f)
    if len(tokens) > 1:
        for tp in sizes[1:]:
            RESULTS[f"greedy_tp{sizes[0]}_vs_tp{tp}"] = _compare_tokens(tokens[sizes[0]], tokens[tp])
    if not args.skip_allreduce:
        import json as _json

        cfg = _json.load(open(os.path.join(CONFIGS, args.l1_config, "config.json")))
        for tp in sizes:
            if tp > 1:
                record(RESULTS, f"allreduce_tp{tp}", allreduce_ms_per_step, tp, cfg["hidden_size"],
                        cfg["num_hidden_layers"], [1, 16, 64, 256])
    print(json.dumps(RESULTS, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"bench_tp_{'_'.join(map(str, sizes))}.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    print_table(RESULTS)


if __name__ == "__main__":
    main()
