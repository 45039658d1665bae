"""Layer chains of the CUDA GEMV with smaller rings (two CTAs per SM), one GPU."""
import json, os, sys
sys.path.insert(0, "benchmarks")
import bench_cuda_gemv_gpu as b  # noqa: E402

VARIANTS = [("192/32", "", ""), ("96/32", "96", ""), ("96/16", "96", "16"), ("64/16", "64", "16")]
res = {}
for name, ring, stage in VARIANTS:
    os.environ["PAGEDLLM_GEMV_RING_KB"] = ring
    os.environ["PAGEDLLM_GEMV_STAGE_KB"] = stage
    res[name] = {"check_ok": b.check()}
print("check", {k: v["check_ok"] for k, v in res.items()}, flush=True)
for tp in (2, 1):
    L = b.Layers(tp)
    for name, ring, stage in VARIANTS:
        os.environ["PAGEDLLM_GEMV_RING_KB"] = ring
        os.environ["PAGEDLLM_GEMV_STAGE_KB"] = stage
        row = {"layer": b.time_graph(lambda: L.run_layers("cuda", False)) * 1000 / 32}
        for g in ("qkv", "o", "gate_up", "down"):
            row[g] = b.time_graph(lambda: L.run_one("cuda", g)) * 1000 / 32
        res[name][f"tp{tp}"] = row
        print(f"TP={tp} {name:7s} us: " + " ".join(f"{k} {v:7.2f}" for k, v in row.items()), flush=True)
    del L
    b.torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "chain.json"), "w"), indent=1)
