"""Layer chains of the CUDA GEMV with the next GEMV's first chunks prefetched into L2
(PAGEDLLM_GEMV_PREFETCH_NEXT = 0, 2, 4, 6), one GPU; us per layer and per GEMV kind."""
import json
import os
import sys

sys.path.insert(0, "benchmarks")
import bench_cuda_gemv_gpu as b  # noqa: E402

res = {}
for tp in (2, 1):
    L = b.Layers(tp)
    for count in ("0", "2", "4", "6"):
        os.environ["PAGEDLLM_GEMV_PREFETCH_NEXT"] = count
        row = {"layer": b.time_graph(lambda: L.run_layers("cuda", False)) * 1000 / 32}
        for g in ("qkv", "o", "gate_up", "down"):
            row[g] = b.time_graph(lambda: L.run_one("cuda", g)) * 1000 / 32
        res.setdefault(count, {})[f"tp{tp}"] = row
        print(f"TP={tp} prefetch {count}: us " + " ".join(f"{k} {v:7.2f}" for k, v in row.items()), flush=True)
    del L
    b.torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prefetch_chain.json"), "w"), indent=1)
