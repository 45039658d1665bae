"""K1: check and time the Triton paged-attention kernels on a CUDA GPU.

    PYTHONPATH=src python benchmarks/bench_attention_gpu.py [--iters 100] [--no-sweep]

1. Correctness: bf16 kernels against an fp32 torch reference (relative error < 1e-2) on the K1
   decode shapes and on mixed prefill/decode batches (head_dim 64/128/256), plus the cache write.
2. Timing: decode attention for K1 (32 query heads, 8 KV heads, head_dim 128, bf16, block size
   16, blocks scattered randomly) as KV GB/s next to the device-to-device copy bandwidth, torch
   SDPA on contiguous KV and a naive gather-then-SDPA; split-KV counts and tile configs are
   swept so the heuristic can be chosen; one causal prefill row for reference.
Every variant is wrapped: a failure prints and the run continues. Prints one short table last
and writes all results to $OUT/k1.json when OUT is set. Needs only torch and triton.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton

from pagedllm.attention import torch_backend
from pagedllm.attention import triton_backend as tb
from pagedllm.attention.metadata import AttentionMetadata

K1_SHAPES = [(1, 32768), (16, 4096), (64, 4096), (256, 1024)]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SPLIT_SWEEP = [1, 2, 4, 8, 16, 32, 64]
# (block_n, num_warps, num_stages) of the decode kernel; the first few also cross every split count
# under --sweep full.
TILE_SWEEP = [(64, 4, 3), (32, 4, 3), (64, 4, 4), (128, 4, 3), (64, 4, 2), (128, 4, 2), (128, 8, 3), (16, 4, 4)]
FULL_SWEEP_TILES = 4
# (block_m, block_n, num_warps, num_stages) of the varlen (prefill) kernel.
PREFILL_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)]
DEVICE = torch.device("cuda")


def make_paged_batch(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
                     head_dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Queries, a KV pool whose blocks are scattered randomly, and decode-first metadata."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks_per_req = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 16
    pool = torch.randperm(num_blocks, generator=gen, device=DEVICE)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int64, device=DEVICE)
    used = 0
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = pool[used : used + n]
        used += n
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen,
                           device=DEVICE, dtype=dtype)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    query = torch.randn(qsl[-1], num_heads, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    metadata = AttentionMetadata(
        num_actual_tokens=qsl[-1], num_decodes=sum(1 for q in query_lens if q == 1),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=DEVICE),
        slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens),
    )
    return query, kv_cache, metadata


def reference(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """The torch backend in fp32 (TF32 off): the oracle."""
    return torch_backend.paged_attention(query.float(), kv_cache.float(), metadata, scale)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over all elements."""
    return ((out.float() - ref).norm() / ref.norm()).item()


class Timer:
    """Median GPU time of a callable, one CUDA-event pair per iteration, L2 flushed before each.

    The flush reads 256 MB (a sum) rather than writing it: written lines would stay dirty in
    L2 and their write-back would be charged to the timed kernel. A spin kernel after it keeps
    the GPU busy while the host enqueues fn's launches, so the events time the kernels back to
    back (as under CUDA graphs), not Python launch gaps.
    """

    def __init__(self, iters: int) -> None:
        self.iters = iters
        self.flush = torch.ones(128 * 1024 * 1024, dtype=torch.float16, device=DEVICE)

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of fn()."""
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.iters):
            self.flush.sum()
            torch.cuda._sleep(1_000_000)  # about 0.5 ms: longer than enqueueing any variant
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * (1 << 30) / ms / 1e6


def attempt(label: str, fn: Callable[[], Any]) -> Any:
    """Run one variant; on failure print the error and return None so the run continues."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark keeps going past a broken variant
        print(f"  [FAILED] {label}: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=3)
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a sticky CUDA error: later variants will report it too
            pass
        return None


def check_correctness(results: dict[str, Any]) -> None:
    """bf16 kernels vs the fp32 oracle on mixed batches and the cache write; records pass/fail."""
    cases = [  # (name, [(query_len, seq_len) per request], num_heads, num_kv_heads, head_dim)
        ("mixed d128 gqa4", [(512, 1512), (1, 1500), (1, 33), (777, 777), (1, 4097), (1, 2048), (1, 900),
                             (300, 2300), (1, 17), (1, 16), (1, 3000), (1, 64)], 32, 8, 128),
        ("mixed d64 gqa3", [(250, 600), (1, 700), (1, 2), (97, 97), (1, 1029)], 9, 3, 64),
        ("mixed d256 gqa2", [(130, 500), (1, 1000), (64, 64), (1, 300)], 8, 4, 256),
        ("mixed d128 mha", [(1, 2049), (200, 999), (1, 31)], 16, 16, 128),
    ]
    for name, requests, h, hkv, d in cases:
        requests = sorted(requests, key=lambda r: r[0] != 1)  # decodes first, as the runner orders them
        query_lens, seq_lens = [r[0] for r in requests], [r[1] for r in requests]
        for splits in (None, 1, 8):
            label = f"{name} splits={splits or 'auto'}"

            def run() -> float:
                q, kv, md = make_paged_batch(query_lens, seq_lens, h, hkv, d, torch.bfloat16, seed=len(seq_lens))
                out = tb.paged_attention(q, kv, md, d ** -0.5, num_kv_splits=splits)
                return rel_error(out, reference(q, kv, md, d ** -0.5))

            err = attempt(label, run)
            results["correctness"].append({"case": label, "rel_error": err, "ok": err is not None and err < 1e-2})
            print(f"  {label:32s} rel_error {err if err is None else f'{err:.2e}'}")

    def cache_write() -> bool:
        kv = torch.randn(2, 64, BLOCK_SIZE, 8, 128, device=DEVICE, dtype=torch.bfloat16)
        expected = kv.clone()
        slots = torch.randperm(64 * BLOCK_SIZE, device=DEVICE)[:300]
        slots[::7] = -1
        key = torch.randn(300, 8, 128, device=DEVICE, dtype=torch.bfloat16)
        value = torch.randn(300, 8, 128, device=DEVICE, dtype=torch.bfloat16)
        torch_backend.write_to_kv_cache(key, value, expected, slots)
        tb.reshape_and_cache(key, value, kv, slots)
        return torch.equal(kv, expected)

    ok = attempt("reshape_and_cache", cache_write)
    results["correctness"].append({"case": "reshape_and_cache", "ok": bool(ok)})
    print(f"  {'reshape_and_cache':32s} {'exact' if ok else 'MISMATCH'}")


def bench_decode_shape(batch: int, context: int, timer: Timer, sweep: str, sm_count: int) -> list[dict[str, Any]]:
    """Check, then time every decode variant of one K1 shape; returns one row per variant."""
    scale = HEAD_DIM ** -0.5
    q, kv, md = make_paged_batch([1] * batch, [context] * batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, torch.bfloat16, seed=batch)
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * kv.element_size()
    ref = attempt("fp32 reference", lambda: reference(q, kv, md, scale))
    out = torch.empty_like(q)
    rows: list[dict[str, Any]] = []
    auto_splits = tb.choose_num_kv_splits(batch, NUM_KV_HEADS, context, sm_count)

    def record(variant: str, fn: Callable[[], Any], check: bool = True, **extra: Any) -> None:
        def run() -> dict[str, Any]:
            err = None
            if check and ref is not None:
                out.fill_(float("nan"))
                fn()
                err = rel_error(out, ref)
            ms = timer(fn)
            return {"variant": variant, "ms": ms, "gbps": kv_bytes / ms / 1e6, "rel_error": err, **extra}

        row = attempt(f"({batch}, {context}) {variant}", run)
        if row is not None:
            row.update(batch=batch, context=context)
            bad = row["rel_error"] is not None and not row["rel_error"] < 1e-2
            err_text = "" if row["rel_error"] is None else f"  rel_error {row['rel_error']:.1e}{'  FAIL' if bad else ''}"
            print(f"  ({batch:3d}, {context:5d}) {variant:30s} {row['ms'] * 1e3:8.1f} us {row['gbps']:7.0f} GB/s{err_text}")
            rows.append(row)

    record(f"triton auto (splits={auto_splits})", lambda: tb.paged_attention(q, kv, md, scale, out=out),
           splits=auto_splits)

    def tiled(splits: int, block_n: int | None = None, warps: int | None = None, stages: int | None = None) -> None:
        tile = "tile=auto" if block_n is None else f"n={block_n} w={warps} st={stages}"
        record(f"triton s={splits} {tile}", lambda: tb.decode_attention(
            q, kv, md.query_start_loc, md.seq_lens, md.block_tables, batch, scale, out,
            num_kv_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages),
            splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)

    split_counts = [s for s in SPLIT_SWEEP if context // s >= 64]
    if sweep == "full":
        for tile in TILE_SWEEP[:FULL_SWEEP_TILES]:
            for splits in split_counts:
                tiled(splits, *tile)
    elif sweep == "default":
        for splits in split_counts:
            tiled(splits)
        swept = [r for r in rows if r["variant"].startswith("triton s=")]
        best_splits = min(swept, key=lambda r: r["ms"])["splits"] if swept else auto_splits
        for tile in TILE_SWEEP:
            tiled(best_splits, *tile)

    # Baselines: SDPA on contiguous KV (a group's query heads as query rows), and gather + SDPA.
    def contiguous_kv() -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for i in range(batch):
            k, v = torch_backend.gather_kv(kv, md.block_tables[i], context)
            keys.append(k.transpose(0, 1))
            values.append(v.transpose(0, 1))
        return torch.stack(keys).contiguous(), torch.stack(values).contiguous()

    k_contig, v_contig = contiguous_kv()
    q_grouped = q.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)

    def sdpa_contiguous() -> None:
        o = F.scaled_dot_product_attention(q_grouped, k_contig, v_contig, scale=scale)
        out.copy_(o.view(batch, NUM_HEADS, HEAD_DIM))

    def sdpa_flash() -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_contiguous()

    record("torch sdpa flash, contiguous KV", sdpa_flash)
    record("torch sdpa auto, contiguous KV", sdpa_contiguous)
    del k_contig, v_contig
    record("naive paged (gather + sdpa)", lambda: torch_backend.paged_attention(q, kv, md, scale, out=out))
    return rows


def bench_prefill(timer: Timer, sweep: bool) -> list[dict[str, Any]]:
    """One causal prefill (4 prompts x 2048 tokens, fresh): TFLOP/s of triton vs contiguous SDPA."""
    num_reqs, length = 4, 2048
    scale = HEAD_DIM ** -0.5
    q, kv, md = make_paged_batch([length] * num_reqs, [length] * num_reqs, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                                 torch.bfloat16, seed=7)
    flops = num_reqs * 4 * NUM_HEADS * HEAD_DIM * length * length / 2  # causal half of QK^T and PV
    out = torch.empty_like(q)
    rows = []
    q_sdpa = q.view(num_reqs, length, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    keys = torch.stack([torch_backend.gather_kv(kv, md.block_tables[i], length)[0].transpose(0, 1)
                        for i in range(num_reqs)]).contiguous()
    values = torch.stack([torch_backend.gather_kv(kv, md.block_tables[i], length)[1].transpose(0, 1)
                          for i in range(num_reqs)]).contiguous()
    variants = {
        "triton varlen": lambda: tb.paged_attention(q, kv, md, scale, out=out),
        "torch sdpa causal, contiguous KV": lambda: F.scaled_dot_product_attention(
            q_sdpa, keys, values, is_causal=True, scale=scale, enable_gqa=True),
    }
    if sweep:
        for bm, bn, w, st in PREFILL_TILES:
            variants[f"triton m={bm} n={bn} w={w} st={st}"] = lambda bm=bm, bn=bn, w=w, st=st: tb.varlen_attention(
                q, kv, md.query_start_loc, md.seq_lens, md.block_tables, 0, num_reqs, num_reqs * length, scale, out,
                block_m=bm, block_n=bn, num_warps=w, num_stages=st)
    ref = attempt("prefill fp32 reference", lambda: reference(q, kv, md, scale))
    for name, fn in variants.items():
        if name.startswith("triton") and ref is not None:
            err = attempt(f"prefill {name}", lambda f=fn: (f(), rel_error(out, ref))[1])
            if err is None or not err < 1e-2:
                print(f"  prefill {name}: rel_error {err} FAILED")
                continue
        ms = attempt(f"prefill {name}", lambda f=fn: timer(f))
        if ms is not None:
            rows.append({"variant": name, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"  prefill 4x2048 {name:34s} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s")
    return rows


def main() -> None:
    """Run the checks and timings; print the summary table and write $OUT/k1.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="timed iterations per variant (median reported)")
    parser.add_argument("--sweep", choices=["none", "default", "full"], default="default",
                        help="decode variants: none (heuristic + baselines), default (split counts, then tiles "
                             "at the best count), full (split counts x the first tiles)")
    parser.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in K1_SHAPES),
                        help="decode shapes as BATCHxCONTEXT, comma separated (default: the K1 shapes)")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    props = torch.cuda.get_device_properties(DEVICE)
    sm_count = props.multi_processor_count
    results: dict[str, Any] = {
        "device": props.name, "sm_count": sm_count, "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"), "correctness": [], "decode": [], "prefill": [],
    }
    print(f"{props.name}, {sm_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    timer = Timer(args.iters)
    results["copy_gbps"] = copy_bw = copy_bandwidth(timer)
    print(f"device-to-device copy: {copy_bw:.0f} GB/s (read + written)")

    print("correctness (bf16 vs fp32 reference):")
    check_correctness(results)
    print("decode timings:")
    for batch, context in shapes:
        results["decode"] += bench_decode_shape(batch, context, timer, args.sweep, sm_count)
        torch.cuda.empty_cache()
    print("prefill timing:")
    results["prefill"] = bench_prefill(timer, args.sweep != "none")
    for row in results["decode"]:
        row["fraction_of_copy"] = row["gbps"] / copy_bw

    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "k1.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")
    print_summary(results, shapes)


def print_summary(results: dict[str, Any], shapes: list[tuple[int, ...]]) -> None:
    """The short table: per K1 shape, auto / best triton against the baselines, as GB/s and copy fraction."""
    copy_bw = results["copy_gbps"]
    failed = [c["case"] for c in results["correctness"] if not c["ok"]]
    bad_variants = [r["variant"] for r in results["decode"] if r["rel_error"] is not None and not r["rel_error"] < 1e-2]
    print(f"\nK1 on {results['device']} ({results['date']}, triton {results['triton']}); copy {copy_bw:.0f} GB/s; "
          f"correctness: {'all ok' if not failed and not bad_variants else 'FAILED ' + ', '.join(failed + bad_variants)}")
    print(f"{'(batch, ctx)':14s} {'triton auto':>13s} {'triton best':>13s} {'best config':>22s} "
          f"{'sdpa flash':>13s} {'sdpa auto':>13s} {'naive paged':>13s}")
    for batch, context in shapes:
        rows = [r for r in results["decode"] if (r["batch"], r["context"]) == (batch, context)]
        by_name = {r["variant"]: r for r in rows}
        triton_rows = [r for r in rows if r["variant"].startswith("triton")]
        auto = next((r for r in rows if r["variant"].startswith("triton auto")), None)
        best = min(triton_rows, key=lambda r: r["ms"], default=None)
        flash = by_name.get("torch sdpa flash, contiguous KV")
        sdpa = by_name.get("torch sdpa auto, contiguous KV")
        naive = by_name.get("naive paged (gather + sdpa)")

        def cell(r: dict[str, Any] | None) -> str:
            return "-" if r is None else f"{r['gbps']:.0f} ({r['gbps'] / copy_bw:.2f})"

        config = "-" if best is None else best["variant"].replace("triton ", "")
        print(f"({batch}, {context})".ljust(14) + f" {cell(auto):>13s} {cell(best):>13s} {config:>22s} "
              f"{cell(flash):>13s} {cell(sdpa):>13s} {cell(naive):>13s}")
    prefill = [r for r in results["prefill"] if r["variant"].startswith("triton")]
    best_prefill = min(prefill, key=lambda r: r["ms"], default=None)
    shown = [r for r in results["prefill"] if not r["variant"].startswith("triton m=")]
    for row in shown + ([best_prefill] if best_prefill and best_prefill not in shown else []):
        print(f"prefill 4x2048 causal, {row['variant']:34s} {row['tflops']:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
