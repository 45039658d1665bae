"""Programmatic dependent launch for the decode GEMMs: same outputs, and what it saves.

    PYTHONPATH=src python benchmarks/bench_pdl_gpu.py

On one GPU, a CUDA graph of 32 "layers" of decode GEMMs at batch 1 (add + RMSNorm + gate_up,
gated down, add + RMSNorm + qkv, a copy standing in for attention, o) with Llama-3.1-8B's TP=1
and TP=2 per-rank shapes, PDL on and off (`PAGEDLLM_DISABLE_PDL`): outputs must be identical,
then the replay time of each. Writes $OUT/pdl.json.
"""

from __future__ import annotations

import json
import os
import time

import torch

from pagedllm.layers.triton_gemv import skinny_linear
from pagedllm.layers.triton_gemv_norm import skinny_add_rmsnorm_linear
from pagedllm.layers.triton_pdl import DISABLE_ENV

LAYERS = 32


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16()

    result: dict = {"device": torch.cuda.get_device_name(0)}
    nw = (1 + rand(4096, scale=0.1).float()).bfloat16()
    for tp in (1, 2):
        w_gu, w_down = rand(28672 // tp, 4096), rand(4096, 14336 // tp)
        w_qkv, w_o = rand(6144 // tp, 4096), rand(4096, 4096 // tp)
        q = 4096 // tp

        def chain(h0: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
            h, r = h0, r0
            for _ in range(LAYERS):
                gu, r = skinny_add_rmsnorm_linear(h, r, nw, 1e-5, w_gu)
                h = skinny_linear(gu, w_down, act="silu")
                qkv, r = skinny_add_rmsnorm_linear(h, r, nw, 1e-5, w_qkv)
                h = skinny_linear(qkv[:, :q].contiguous(), w_o)
            return torch.cat([h, r], dim=1)

        h0, r0 = rand(1, 4096, scale=1.0), rand(1, 4096, scale=1.0)
        outs, times = {}, {}
        for name, disable in (("plain", "1"), ("pdl", "0"), ("plain_again", "1"), ("pdl_again", "0")):
            os.environ[DISABLE_ENV] = disable
            eager = chain(h0, r0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = chain(h0, r0)
            graph.replay()
            torch.cuda.synchronize()
            outs[name] = static.clone()
            result[f"tp{tp}_{name}_graph_equals_eager"] = bool(torch.equal(static, eager))
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(100):
                graph.replay()
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - t0) / 100 * 1e3
            result[f"tp{tp}_{name}_ms"] = times[name]
        result[f"tp{tp}_pdl_equals_plain"] = bool(torch.equal(outs["pdl"], outs["plain"]))
        plain = (times["plain"] + times["plain_again"]) / 2
        pdl = (times["pdl"] + times["pdl_again"]) / 2
        result[f"tp{tp}_saved_ms_per_32_layers"] = plain - pdl
        bytes_per_layer = sum(w.numel() * 2 for w in (w_gu, w_down, w_qkv, w_o))
        result[f"tp{tp}_weight_gb"] = bytes_per_layer * LAYERS / 1e9
        del w_gu, w_down, w_qkv, w_o
    print(json.dumps(result, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "pdl.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
