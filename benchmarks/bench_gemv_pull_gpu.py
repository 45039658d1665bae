"""The pulled add + RMSNorm GEMV (the reader of a GEMV-carried all-reduce) against the plain one,
on one GPU, at the TP=2 shapes of Llama-3.1-8B: where does the reader's time go?

Two ranks are simulated as in tests/kernels/test_cuda_gemv.py: a stand-in for the peer's down
projection pushes rank 1's rows and count into the site buffer, then this rank's down projection
pushes rank 0's, then the QKV projection pulls both (the best case of the engine: no skew, no
NVLink latency). The plain chain runs the same three GEMVs without the site (the down output
goes to a tensor that the QKV projection reads). Each chain of 32 such triples is one CUDA graph;
median of 20 replays. Per-CTA global-timer stamps of one triple (start, operand in, done) show
the reader's phases from its writer's last CTA.

    PYTHONPATH=src python benchmarks/bench_gemv_pull_gpu.py

Variants: the reader's pacing (`AHEAD`, stages in flight before the operand is in) and the
ticketed fraction of the chunks (`DYNAMIC_FRACTION`), both module constants of cuda_gemv.py.
Prints a table last and writes JSON to $OUT.
"""

from __future__ import annotations

import json
import os
import statistics

import torch
from bench_gemv_gpu import median_replay_us

from pagedllm.layers import cuda_gemv

HIDDEN, INTER, QKV_ROWS = 4096, 14336 // 2, (4096 + 2 * 1024) // 2  # TP=2 shapes of the 8B
CHAIN = 32


def tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    return {"w_down": rand(HIDDEN, INTER), "w_down_peer": rand(HIDDEN, INTER), "w_qkv": rand(QKV_ROWS, HIDDEN),
            "gated": rand(1, 2 * INTER, scale=1.0), "residual": rand(1, HIDDEN, scale=1.0),
            "norm": (1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=g)).bfloat16()}


def triple(t: dict[str, torch.Tensor], pull: bool, site: dict | None, hidden: torch.Tensor, out: torch.Tensor,
           res_out: torch.Tensor, stamps: list[torch.Tensor] | None = None) -> None:
    """Peer stand-in down, this rank's down, the QKV reader (pulled or plain)."""
    s = stamps or [None, None, None]
    if pull:
        assert site is not None
        for rank, w, stamp in ((1, t["w_down_peer"], s[0]), (0, t["w_down"], s[1])):
            cuda_gemv.gemv("silu", t["gated"], w, None, stamps=stamp,
                           push=cuda_gemv.Exchange(site["buffer"], (site["buffer"].data_ptr(),), site["epoch"], rank, 2))
        cuda_gemv.gemv("add_rmsnorm", t["residual"], t["w_qkv"], out, None, t["residual"], t["norm"], 1e-6, res_out,
                       stamps=s[2], pull=cuda_gemv.Exchange(site["buffer"], (site["buffer"].data_ptr(),), site["epoch"],
                                                            0, 2))
    else:
        cuda_gemv.gemv("silu", t["gated"], t["w_down_peer"], hidden, stamps=s[0])
        cuda_gemv.gemv("silu", t["gated"], t["w_down"], hidden, stamps=s[1])
        cuda_gemv.gemv("add_rmsnorm", hidden, t["w_qkv"], out, None, t["residual"], t["norm"], 1e-6, res_out,
                       stamps=s[2])


def run_variant(t: dict[str, torch.Tensor], pull: bool) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    site = {"buffer": torch.zeros(cuda_gemv.exchange_buffer_bytes(2, HIDDEN) // 8, dtype=torch.int64, device="cuda"),
            "epoch": torch.zeros(2, dtype=torch.int64, device="cuda")} if pull else None
    hidden = torch.empty(1, HIDDEN, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(1, QKV_ROWS, dtype=torch.bfloat16, device="cuda")
    res_out = torch.empty(1, HIDDEN, dtype=torch.bfloat16, device="cuda")
    stamps = [torch.zeros(sms * 4, dtype=torch.int64, device="cuda") for _ in range(3)]
    for _ in range(3):  # warm: tickets, the extension, the site's calls
        triple(t, pull, site, hidden, out, res_out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        triple(t, pull, site, hidden, out, res_out)  # warm on the capture stream
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(CHAIN):
                triple(t, pull, site, hidden, out, res_out, stamps if i == CHAIN // 2 else None)
    per_triple = median_replay_us(graph, 20, warm_ups=3) / CHAIN
    st = [s.view(sms, 4).cpu() for s in stamps]
    writer_end = int(st[1][:, 2].max())
    reader = st[2]
    rel = lambda col: sorted(((reader[:, col] - writer_end) / 1e3).tolist())  # noqa: E731
    starts, ready, done = rel(0), rel(1), rel(2)
    peer_end = (int(st[0][:, 2].max()) - writer_end) / 1e3
    return {"us_per_triple": per_triple, "peer_writer_end_us": peer_end,
            "reader_first_start_us": starts[0], "reader_median_start_us": statistics.median(starts),
            "reader_operand_median_us": statistics.median(ready), "reader_operand_last_us": ready[-1],
            "reader_done_median_us": statistics.median(done), "reader_done_last_us": done[-1],
            "writer_span_us": (writer_end - int(st[1][:, 0].min())) / 1e3}


def main() -> None:
    assert cuda_gemv.available(), "the extension did not build"
    t = tensors(torch.Generator(device="cuda").manual_seed(0))
    results = {"device": torch.cuda.get_device_name(0), "variants": {}}
    defaults = (cuda_gemv.AHEAD, cuda_gemv.DYNAMIC_FRACTION)
    for ahead in (2, 6, 0):
        for dynamic in (0.2, 0.1):
            cuda_gemv.AHEAD, cuda_gemv.DYNAMIC_FRACTION = ahead, dynamic
            for pull in (False, True):
                name = f"{'pull' if pull else 'plain'} ahead={ahead} dynamic={dynamic}"
                results["variants"][name] = run_variant(t, pull)
                print(name, json.dumps({k: round(v, 2) for k, v in results["variants"][name].items()}), flush=True)
    cuda_gemv.AHEAD, cuda_gemv.DYNAMIC_FRACTION = defaults
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemv_pull.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n| variant | us per triple | reader operand in (median / last) | reader done (median / last) |")
    print("| --- | --- | --- | --- |")
    for name, r in results["variants"].items():
        print(f"| {name} | {r['us_per_triple']:.2f} | {r['reader_operand_median_us']:.2f} / "
              f"{r['reader_operand_last_us']:.2f} | {r['reader_done_median_us']:.2f} / {r['reader_done_last_us']:.2f} |")


if __name__ == "__main__":
    main()
