"""Time the decode attention cluster of one layer with and without the steps folded into its kernel.

    PYTHONPATH=src python benchmarks/bench_decode_fold_gpu.py [--seq-lens 300,2048] [--replays 20]

Llama-3.1-8B attention shapes per rank at TP=1 (32 query / 8 KV heads) and TP=2 (16 / 4), head
dim 128, bf16, block size 16, batch 1 (and 16), the split count a CUDA graph captured for
max_model_len 4096 would use. A CUDA graph of 32 "layers" (each its own KV pool and QKV buffer)
is replayed; us per layer = median replay time / 32. Variants:
- separate: rotary kernel, reshape_and_cache, decode kernel (+ split-reduce kernel): the path
  of mixed batches and of --no-fused-kernels;
- folded: the decode kernel rotates and writes the new K/V itself (+ split-reduce kernel): the
  engine's decode-only path;
- cuda, cuda16: the CUDA decode kernel (attention/cuda_decode.py: rotary, K/V write, the
  partitions combined inside the kernel through a thread-block cluster) with clusters of up to
  8 (the engine's) or 16 CTAs;
- and the pieces alone (rotary, reshape_and_cache, decode + reduce).
(A third variant, the split reduce folded in too, was measured 3-4 us per layer slower at
batch 1 on an H200 and dropped; it is in git history at fc6242f.)
Checks first that every variant gives the separate path's output (max |diff|). Prints a table
last and writes $OUT/decode_fold.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pagedllm.attention import cuda_decode
from pagedllm.attention import triton_backend as tb
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers import triton_fused
from pagedllm.layers.rotary import RotaryEmbedding

sys.path.insert(0, os.path.dirname(__file__))
from bench_gemv_gpu import median_replay_us  # noqa: E402

DEVICE = torch.device("cuda")
HEAD_DIM, BLOCK_SIZE, LAYERS, MAX_MODEL_LEN = 128, 16, 32, 4096
SCALE = HEAD_DIM ** -0.5


class Layer:
    """One layer's inputs: a fused QKV output, a scattered KV pool, and the decode metadata."""

    def __init__(self, batch: int, seq_len: int, heads: int, kv_heads: int, seed: int) -> None:
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        blocks_per_req = -(-seq_len // BLOCK_SIZE)
        num_blocks = batch * blocks_per_req + 8
        pool = torch.randperm(num_blocks, generator=gen, device=DEVICE)
        self.block_tables = pool[: batch * blocks_per_req].view(batch, blocks_per_req).contiguous()
        self.kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen, device=DEVICE,
                                    dtype=torch.bfloat16)
        q_size, kv_size = heads * HEAD_DIM, kv_heads * HEAD_DIM
        self.qkv = torch.randn(batch, q_size + 2 * kv_size, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        q, k, v = self.qkv.split([q_size, kv_size, kv_size], dim=-1)
        self.q, self.k, self.v = (q.view(batch, heads, HEAD_DIM), k.view(batch, kv_heads, HEAD_DIM),
                                  v.view(batch, kv_heads, HEAD_DIM))
        pos = seq_len - 1
        slots = [int(self.block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE for i in range(batch)]
        self.positions = torch.full((batch,), pos, dtype=torch.long, device=DEVICE)
        self.metadata = AttentionMetadata(
            num_actual_tokens=batch, num_decodes=batch,
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.full((batch,), seq_len, dtype=torch.long, device=DEVICE),
            slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=self.block_tables,
            max_query_len=1, max_seq_len=MAX_MODEL_LEN, query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=[MAX_MODEL_LEN] * batch)
        self.out = torch.empty_like(self.q)


def run_variant(name: str, layer: Layer, rotary: RotaryEmbedding, splits: int, **launch: int) -> None:
    """One variant's kernels on `layer`; `launch` overrides the decode kernel's tile (block_n,
    num_warps, num_stages)."""
    md = layer.metadata
    args = (md.query_start_loc, md.seq_lens, md.block_tables, md.num_decodes, SCALE, layer.out)
    new_tokens = tb.NewTokens(layer.k, layer.v, md.slot_mapping, layer.positions, rotary.cos_cache,
                              rotary.sin_cache)
    if name in ("separate", "rotary"):
        triton_fused.rotary_embedding_(layer.positions, layer.q, layer.k, rotary.cos_cache, rotary.sin_cache,
                                       HEAD_DIM)
    if name in ("separate", "reshape_and_cache"):
        tb.reshape_and_cache(layer.k, layer.v, layer.kv_cache, md.slot_mapping)
    if name in ("separate", "decode + reduce"):
        tb.decode_attention(layer.q, layer.kv_cache, *args, num_kv_splits=splits, **launch)
    elif name == "folded":
        tb.decode_attention(layer.q, layer.kv_cache, *args, num_kv_splits=splits, new_tokens=new_tokens, **launch)
    elif name in ("cuda", "cuda16"):
        engine_cluster = cuda_decode.MAX_CLUSTER
        cuda_decode.MAX_CLUSTER = 16 if name == "cuda16" else engine_cluster
        try:
            cuda_decode.decode_attention(layer.q, layer.kv_cache, md.seq_lens, md.block_tables, md.num_decodes,
                                         SCALE, layer.out, new_tokens)
        finally:
            cuda_decode.MAX_CLUSTER = engine_cluster


VARIANTS = ["separate", "folded", "cuda", "cuda16", "rotary", "reshape_and_cache", "decode + reduce"]


def check(batch: int, seq_len: int, heads: int, kv_heads: int, rotary: RotaryEmbedding, splits: int) -> dict:
    """Max |output - separate path's output| and whether the caches agree, for the folded paths."""
    results = {}
    reference = None
    for name in ("separate", "folded", "cuda", "cuda16"):
        layer = Layer(batch, seq_len, heads, kv_heads, seed=1)
        run_variant(name, layer, rotary, splits)
        torch.cuda.synchronize()
        if reference is None:
            reference = layer
            continue
        results[name] = {"max_abs_diff": (layer.out.float() - reference.out.float()).abs().max().item(),
                         "cache_equal": bool(torch.equal(layer.kv_cache, reference.kv_cache)),
                         "cache_max_abs_diff": (layer.kv_cache.float() - reference.kv_cache.float()).abs().max().item()}
    return results


def time_variant(name: str, layers: list[Layer], rotary: RotaryEmbedding, splits: int, replays: int,
                 **launch: int) -> float:
    """us per layer: a CUDA graph of the variant over every layer, median over replays."""
    for layer in layers:  # compile and allocate outside the capture
        run_variant(name, layer, rotary, splits, **launch)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in layers:
            run_variant(name, layer, rotary, splits, **launch)
    return median_replay_us(graph, replays, warm_ups=3) / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="300,2048")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of them to time (comma-separated)")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    rotary = RotaryEmbedding(HEAD_DIM, HEAD_DIM, MAX_MODEL_LEN,
                             {"rope_theta": 500000.0, "rope_type": "default"}).to(DEVICE)
    sms = tb.num_sms(DEVICE)
    rows = []
    for tp, (heads, kv_heads) in ((1, (32, 8)), (2, (16, 4))):
        for batch in (int(b) for b in args.batches.split(",")):
            splits = tb.choose_num_kv_splits(batch, kv_heads, MAX_MODEL_LEN, sms)
            for seq_len in (int(s) for s in args.seq_lens.split(",")):
                row = {"tp": tp, "batch": batch, "seq_len": seq_len, "splits": splits,
                       "check": check(batch, seq_len, heads, kv_heads, rotary, splits)}
                layers = [Layer(batch, seq_len, heads, kv_heads, seed=i) for i in range(LAYERS)]
                for name in variants:
                    row[name] = time_variant(name, layers, rotary, splits, args.replays)
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "decode_fold.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print("\n| tp | batch | seq | splits | " + " | ".join(variants) + " |  (us per layer)")
    print("| --- " * (4 + len(variants)) + "|")
    for row in rows:
        print(f"| {row['tp']} | {row['batch']} | {row['seq_len']} | {row['splits']} | "
              + " | ".join(f"{row[name]:.2f}" for name in variants) + " |")


if __name__ == "__main__":
    main()
