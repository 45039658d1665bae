"""The all-reduce inside the skinny GEMM on two GPUs: bit-exactness against NCCL and its cost.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \\
        python benchmarks/check_gemm_all_reduce_gpu.py

Per rank, with Llama-3.1-8B's TP=2 shapes (o_proj [4096, 2048], down_proj [4096, 7168] gated;
gate_up [14336, 4096] and qkv [3072, 4096] with add + RMSNorm between them):
1. eager, M in 1 and 2: the GEMM with the all-reduce inside == the skinny GEMM + NCCL all-reduce;
2. a CUDA graph of 32 "layers" (gate_up, down, qkv, o) with the all-reduce inside the GEMMs,
   against the same chain with the one-shot all-reduce kernel after each: identical outputs
   after replay, and the replay time of each (what the fusion saves per decode step).
Writes $OUT/gemm_all_reduce.json. A rank that does not finish in time counts as a hang.
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
    from pagedllm.layers.triton_gemv import skinny_linear, skinny_linear_all_reduce
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

    # 1. eager, the sizes that fuse
    for m in (1, 2):
        x = rand(m, 2048, scale=1.0)
        ref = skinny_linear(x, w_o)
        dist.all_reduce(ref)
        out[f"m{m}_equals_nccl"] = bool(torch.equal(skinny_linear_all_reduce(x, w_o, comm), ref))
        gu = rand(m, 14336, scale=1.0)
        ref = skinny_linear(gu, w_down, act="silu")
        dist.all_reduce(ref)
        out[f"m{m}_gated_equals_nccl"] = bool(torch.equal(skinny_linear_all_reduce(gu, w_down, comm, act="silu"), ref))
    torch.cuda.synchronize()

    # 2. 32 layers in a CUDA graph, all-reduce inside the GEMMs vs the one-shot kernel after them
    def chain(h0: torch.Tensor, r0: torch.Tensor, fused: bool) -> torch.Tensor:
        h, r = h0, r0
        for _ in range(LAYERS):
            gu, r = skinny_add_rmsnorm_linear(h, r, nw, eps, w_gu)
            h = (skinny_linear_all_reduce(gu, w_down, comm, act="silu") if fused
                 else pd.tensor_model_parallel_all_reduce(skinny_linear(gu, w_down, act="silu")))
            qkv, r = skinny_add_rmsnorm_linear(h, r, nw, eps, w_qkv)
            attn = qkv[:, :2048].contiguous()
            h = (skinny_linear_all_reduce(attn, w_o, comm) if fused
                 else pd.tensor_model_parallel_all_reduce(skinny_linear(attn, w_o)))
        return torch.cat([h, r], dim=1)

    h0, r0 = rand(1, 4096, g=shared, scale=1.0), rand(1, 4096, g=shared, scale=1.0)
    results, times = {}, {}
    for name, fused in (("one_shot", False), ("fused", True), ("one_shot_again", False)):
        eager = chain(h0, r0, fused)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = chain(h0, r0, fused)
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
    out["fused_equals_one_shot"] = bool(torch.equal(results["fused"], results["one_shot"]))
    baseline = (times["one_shot"] + times["one_shot_again"]) / 2
    out["saved_us_per_all_reduce"] = (baseline - times["fused"]) * 1e3 / (2 * LAYERS)
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
        with open(os.path.join(out, "gemm_all_reduce.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
