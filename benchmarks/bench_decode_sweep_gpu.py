"""Sweep the batch-1 decode attention launch (splits, KV tile, warps) over context lengths.

    PYTHONPATH=src:benchmarks python benchmarks/bench_decode_sweep_gpu.py [--seq-lens 150,300,1024,4000]
        [--partitions]

A CUDA graph captures one split count and one tile shape for every context up to max_model_len,
so the choice must serve short and long contexts alike. For Llama-3.1-8B's attention per rank at
TP=1 (32 / 8 heads) and TP=2 (16 / 4), batch 1, bf16, the folded decode path (rotary and K/V
write in the kernel, then the split reduce) as the engine runs it, us per layer in a graph of 32
layers (`bench_decode_fold_gpu.Layer`), each config checked against the default launch's output.
Prints a table per TP size (rows: configs, columns: contexts); JSON to $OUT/decode_sweep.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode_fold_gpu import (  # noqa: E402
    DEVICE, HEAD_DIM, LAYERS, MAX_MODEL_LEN, Layer, run_variant, time_variant,
)
from pagedllm.attention import triton_backend as tb  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="150,300,1024,4000")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--partitions", action="store_true",
                    help="only the engine's launch against partitions shorter than its tile "
                         "(partition_tokens 16 / 32 / 64 at 32 and 64 splits) and 32-token tiles")
    args = ap.parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    rotary = RotaryEmbedding(HEAD_DIM, HEAD_DIM, MAX_MODEL_LEN,
                             {"rope_theta": 500000.0, "rope_type": "default"}).to(DEVICE)
    sms = tb.num_sms(DEVICE)
    results = []
    for tp, (heads, kv_heads) in ((1, (32, 8)), (2, (16, 4))):
        default_splits = tb.choose_num_kv_splits(1, kv_heads, MAX_MODEL_LEN, sms)
        configs = [{"splits": default_splits}]  # the engine's launch
        if args.partitions:
            configs += [{"splits": splits, "partition_tokens": part} for splits, part in
                        itertools.product((default_splits, 2 * default_splits), (16, 32, 64))]
            configs.append({"splits": default_splits, "block_n": 32})
        else:
            for splits, block_n, warps in itertools.product((8, 16, 32, 64), (16, 32, 64, 128), (2, 4)):
                configs.append({"splits": splits, "block_n": block_n, "num_warps": warps})
        table = {}
        for seq_len in seq_lens:
            reference = Layer(1, seq_len, heads, kv_heads, seed=1)
            run_variant("folded", reference, rotary, **configs[0])
            layers = [Layer(1, seq_len, heads, kv_heads, seed=i) for i in range(LAYERS)]
            for config in configs:
                key = json.dumps(config)
                check = Layer(1, seq_len, heads, kv_heads, seed=1)
                try:
                    run_variant("folded", check, rotary, **config)
                    diff = (check.out.float() - reference.out.float()).abs().max().item()
                    us = time_variant("folded", layers, rotary, replays=args.replays, **config)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"TP={tp} {key} seq {seq_len}: failed ({type(exc).__name__}: {exc})", flush=True)
                    continue
                table.setdefault(key, {})[seq_len] = {"us": us, "max_abs_diff": diff}
        results.append({"tp": tp, "default_splits": default_splits, "table": table})
        default_key = json.dumps(configs[0])
        print(f"\nTP={tp}: us per layer (default: {default_key})")
        print("| config | " + " | ".join(str(s) for s in seq_lens) + " | max diff |")
        ranked = sorted(table.items(), key=lambda kv: sum(v["us"] for v in kv[1].values()))
        for key, row in [(default_key, table.get(default_key, {}))] + ranked[:12]:
            cells = [f"{row[s]['us']:.2f}" if s in row else "-" for s in seq_lens]
            diff = max((v["max_abs_diff"] for v in row.values()), default=float("nan"))
            print(f"| {key} | " + " | ".join(cells) + f" | {diff:.1e} |", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "decode_sweep.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
