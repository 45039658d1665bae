"""The deferred all-reduce on two GPUs: bit-exactness against NCCL and the unfused path, and its cost.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \\
        python benchmarks/check_deferred_all_reduce_gpu.py

Per rank, with Llama-3.1-8B's TP=2 shapes (o_proj [4096, 2048], down_proj [4096, 7168] gated,
gate_up [14336, 4096] and qkv [3072, 4096] as consumers):
1. eager, M in 1, 2, 8, 16: the pushed GEMM resolved == the skinny GEMM + NCCL all-reduce, and
   the add + RMSNorm GEMM summing the pushed blocks == the same kernel on the reduced tensor;
2. a CUDA graph of 32 "layers" (gate_up <- o, qkv <- down) with the deferred all-reduce, against
   the same chain with the separate one-shot all-reduce kernel: identical outputs after replay,
   and the replay time of each (what the deferred all-reduce saves per decode step).
Writes $OUT/deferred_all_reduce.json. A rank that does not finish in time counts as a hang.
"""

from __future__ import annotations

import json
import os
import time

import torch

LAYERS = 32


def _rank_main(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    import pagedllm.distributed as pd
    from pagedllm.layers.triton_gemv import skinny_linear, skinny_linear_push
    from pagedllm.layers.triton_gemv_norm import skinny_add_rmsnorm_linear

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    pd.init_distributed_environment(rank, world, f"tcp://127.0.0.1:{port}", device)
    comm = pd.get_custom_all_reduce()
    out: dict = {"custom": comm is not None, "fused": bool(comm is not None and comm.fuse_into_gemm)}
    if not out["fused"]:
        q.put((rank, out))
        return
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)  # each rank its own shard
    shared = torch.Generator(device="cuda").manual_seed(99)  # replicated tensors

    def rand(*shape, g=gen, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()

    w_o, w_down = rand(4096, 2048), rand(4096, 7168)
    w_gu, w_qkv = rand(14336, 4096), rand(3072, 4096)
    nw = (1 + rand(4096, g=shared, scale=0.1).float()).bfloat16()
    eps = 1e-5

    # 1. eager, every M bucket
    for m in (1, 2, 8, 16):
        x = rand(m, 2048, scale=1.0)
        residual = rand(m, 4096, g=shared, scale=1.0)
        ref = skinny_linear(x, w_o)
        dist.all_reduce(ref)
        pushed = skinny_linear_push(x, w_o, comm)
        got = pushed.resolve()
        out[f"m{m}_resolve_equals_nccl"] = bool(torch.equal(got, ref))
        want = skinny_add_rmsnorm_linear(ref, residual, nw, eps, w_gu)
        pushed = skinny_linear_push(x, w_o, comm)
        have = skinny_add_rmsnorm_linear(pushed, residual, nw, eps, w_gu)
        out[f"m{m}_consumer_equals_unfused"] = bool(torch.equal(have[0], want[0]) and torch.equal(have[1], want[1]))
        gu = rand(m, 14336, scale=1.0)
        ref = skinny_linear(gu, w_down, act="silu")
        dist.all_reduce(ref)
        got = skinny_linear_push(gu, w_down, comm, act="silu").resolve()
        out[f"m{m}_gated_resolve_equals_nccl"] = bool(torch.equal(got, ref))
    torch.cuda.synchronize()

    # 2. 32 layers in a CUDA graph, deferred vs the one-shot all-reduce kernel
    def chain(h0: torch.Tensor, r0: torch.Tensor, deferred: bool) -> torch.Tensor:
        h, r = h0, r0
        for _ in range(LAYERS):
            gu, r = skinny_add_rmsnorm_linear(h, r, nw, eps, w_gu)
            h = (skinny_linear_push(gu, w_down, comm, act="silu") if deferred
                 else pd.tensor_model_parallel_all_reduce(skinny_linear(gu, w_down, act="silu")))
            qkv, r = skinny_add_rmsnorm_linear(h, r, nw, eps, w_qkv)
            attn = qkv[:, :2048].contiguous()
            h = (skinny_linear_push(attn, w_o, comm) if deferred
                 else pd.tensor_model_parallel_all_reduce(skinny_linear(attn, w_o)))
        return torch.cat([h.resolve() if deferred else h, r], dim=1)

    h0, r0 = rand(1, 4096, g=shared, scale=1.0), rand(1, 4096, g=shared, scale=1.0)
    results, times = {}, {}
    for deferred in (False, True):
        name = "deferred" if deferred else "one_shot"
        eager = chain(h0, r0, deferred)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = chain(h0, r0, deferred)
        graph.replay()
        torch.cuda.synchronize()
        results[name] = static.clone()
        out[f"{name}_graph_equals_eager"] = bool(torch.equal(static, eager))
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t0) / 50 * 1e3
        out[f"{name}_ms_per_{LAYERS}_layers"] = times[name]
        out[f"{name}_equals_after_50_replays"] = bool(torch.equal(static, results[name]))
    out["deferred_equals_one_shot"] = bool(torch.equal(results["deferred"], results["one_shot"]))
    out["saved_us_per_all_reduce"] = (times["one_shot"] - times["deferred"]) * 1e3 / (2 * LAYERS)
    q.put((rank, out))
    pd.destroy_distributed_environment()


def main() -> None:
    import torch.multiprocessing as mp

    from pagedllm.executor.multiproc import get_open_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = get_open_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    result: dict = {"device": torch.cuda.get_device_name(0)}
    try:
        for _ in procs:
            rank, res = q.get(timeout=400)
            result[f"rank{rank}"] = res
    except Exception as e:  # noqa: BLE001 - a hang or a crash: report it
        result["error"] = f"no result in time ({type(e).__name__}): hang or crash"
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    print(json.dumps(result, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "deferred_all_reduce.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
