"""Sweep the one-shot all-reduce kernel's chunk size and warps on a decode step's all-reduces.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:benchmarks \
        python benchmarks/bench_allreduce_sweep_gpu.py [--world 2] [--batches 1,16]

Per (chunk words, warps, most programs) of `one_shot_all_reduce.py`: 64 all-reduces of bf16 [batch, 4096] in a
CUDA graph (one decode step of Llama-3.1-8B at TP=2), the result checked against NCCL's (bit for
bit), microseconds per all-reduce (median of 20 replays). Prints a table; JSON to
$OUT/allreduce_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_gemv_gpu import median_replay_us  # noqa: E402
from bench_tp_gpu import all_reduce_graph  # noqa: E402

HIDDEN, CALLS = 4096, 64
# (chunk words, warps, most programs)
SWEEP = [(1024, 4, 32), (512, 8, 32), (512, 8, 64), (256, 8, 32), (256, 8, 64), (256, 4, 64), (256, 8, 128),
         (128, 8, 64), (128, 4, 128)]


def _worker(rank: int, world: int, port: int, batches: list[int], q) -> None:
    import torch.distributed as dist

    import pagedllm.distributed as pd
    from pagedllm import one_shot_all_reduce as osar

    torch.cuda.set_device(rank)
    osar.MAX_PROGRAMS = max(programs for _, _, programs in SWEEP)  # sizes the epoch counters
    pd.init_distributed_environment(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cuda", rank))
    rows = []
    for block, warps, programs in SWEEP:
        # Both ranks switch together: a chunk size change between calls in flight could let one
        # rank overwrite words the other has not read yet.
        torch.cuda.synchronize()
        dist.barrier()
        osar._BLOCK, osar._NUM_WARPS, osar.MAX_PROGRAMS = block, warps, programs
        for batch in batches:
            x = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(rank))
            graph, equal = all_reduce_graph(x, CALLS, warm_ups=4)
            us = median_replay_us(graph, 20, warm_ups=0) / CALLS
            rows.append({"block_words": block, "warps": warps, "max_programs": programs, "batch": batch,
                         "programs": osar.num_programs(batch * HIDDEN),
                         "us_per_all_reduce": us, "equals_nccl": equal})
            del graph
    if rank == 0:
        q.put(rows)
    pd.destroy_distributed_environment()


def main() -> None:
    import torch.multiprocessing as mp

    from pagedllm.distributed import host_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = host_store()  # the ranks' rendezvous, served from here
    port = store.port
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, batches, q)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = q.get(timeout=500)
    for p in procs:
        p.join(timeout=60)
    print(f"\n{torch.cuda.get_device_name(0)} x {args.world}: us per all-reduce, {CALLS} in a graph")
    print("| chunk words | warps | most programs | batch | programs | us | equals NCCL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['block_words']} | {r['warps']} | {r['max_programs']} | {r['batch']} | {r['programs']} | "
              f"{r['us_per_all_reduce']:.2f} | "
              f"{r['equals_nccl']} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "allreduce_sweep.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "world": args.world, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
