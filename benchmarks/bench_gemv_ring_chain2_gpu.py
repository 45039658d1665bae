"""Layer chains of the CUDA GEMV with other ring / stage sizes, one GPU; prints the best two as L1 specs."""
import json, os, sys
sys.path.insert(0, "benchmarks")
import bench_cuda_gemv_gpu as b  # noqa: E402

VARIANTS = [("192/32", "", ""), ("216/32", "216", "32"), ("216/24", "216", "24"), ("216/40", "216", "40"),
            ("216/48", "216", "48")]
res = {}
for tp in (2, 1):
    L = b.Layers(tp)
    for name, ring, stage in VARIANTS:
        os.environ["PAGEDLLM_GEMV_RING_KB"] = ring
        os.environ["PAGEDLLM_GEMV_STAGE_KB"] = stage
        row = {"layer": b.time_graph(lambda: L.run_layers("cuda", False)) * 1000 / 32}
        for g in ("qkv", "o", "gate_up", "down"):
            row[g] = b.time_graph(lambda: L.run_one("cuda", g)) * 1000 / 32
        res.setdefault(name, {})[f"tp{tp}"] = row
        print(f"TP={tp} {name:7s} us: " + " ".join(f"{k} {v:7.2f}" for k, v in row.items()), file=sys.stderr, flush=True)
    del L
    b.torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "chain2.json"), "w"), indent=1)
ranked = sorted((n for n, _, _ in VARIANTS[1:]), key=lambda n: res[n]["tp2"]["layer"] + 0.6 * res[n]["tp1"]["layer"])
specs = []
for n in ranked[:2]:
    ring, stage = n.split("/")
    tag = n.replace("/", "_")
    specs.append((tag, f"PAGEDLLM_GEMV_RING_KB={ring},PAGEDLLM_GEMV_STAGE_KB={stage}"))
print(" ".join(["tp2:2:"] + [f"tp2_{t}:2:{e}" for t, e in specs] + ["tp1:1:"] + [f"tp1_{t}:1:{e}" for t, e in specs]))
