"""Does a persistent kernel stream a decode layer's GEMMs faster than one kernel per GEMM?

    PYTHONPATH=src:benchmarks python benchmarks/bench_persistent_chain_gpu.py [--tp 1,2] [--replays 20]

A feasibility experiment for issue #6 (docs/parallelism.md): at batch 1 every decode GEMM kernel
pays a fixed ramp-up and tail, which TP=2's half-size GEMMs feel twice as much. Here one launch
per layer runs the four GEMMs of a Llama-3.1-8B layer (at one rank's shapes for the TP size) as
phases of a persistent kernel, one program per SM:

    O [H, H/tp] -> gate_up [2I/tp, H] -> down [H, I/tp] (reads the first I/tp outputs) -> QKV

Each phase writes its output (fp32) to a scratch vector; a program then sets its flag to the
launch's epoch (release, after a CTA barrier) and waits until every program's flag carries it
(one vector load of the flags per poll, then an acquire fence): a grid barrier. BARRIER=0 skips
the waits -- wrong results, but the streaming bound of the persistent GEMMs themselves. PRELOAD
loads the first weight tile of the program's next phase into registers before it waits (consumed
after the wait), so DRAM keeps streaming across the barrier. A first version handed the vectors
over as LL words (value and epoch in one int64, the one-shot all-reduce's protocol) and had every
program poll the whole input vector: far slower (docs/benchmarks.md, seventh session).

Baseline in the same call: the same four GEMMs as four `skinny_linear` launches (tuned configs),
32 layers in a CUDA graph either way, distinct weights per layer (so every byte comes from DRAM).
Prints ms per 32 layers and TB/s, last a table; JSON to $OUT/persistent_chain.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from pagedllm.layers import triton_gemv as tg  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_gemv_gpu import median_replay_us  # noqa: E402
from gpu_check import write_results  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144
LAYERS = 32


@triton.jit
def _load_x(x_ptr, k, k_ok, FRESH: tl.constexpr):
    if FRESH:  # written by this launch: read at L2 (.cg), never a stale L1 line
        return tl.load(x_ptr + k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    return tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def _arrive(flags_ptr, pid, epoch):
    """This program's outputs of the phase are written: publish `epoch` in its flag (release,
    after a CTA barrier so every thread's stores are ordered before it)."""
    tl.debug_barrier()
    tl.atomic_xchg(flags_ptr + pid, epoch, sem="release", scope="gpu")


@triton.jit
def _wait_all(flags_ptr, G, epoch, MAX_G: tl.constexpr):
    """Spin until every program's flag carries `epoch`, then an acquire fence."""
    offs = tl.arange(0, MAX_G)
    ok_mask = offs < G
    f = tl.load(flags_ptr + offs, mask=ok_mask, other=0, volatile=True)
    missing = tl.sum(((f != epoch) & ok_mask).to(tl.int32), axis=0)
    while missing > 0:
        f = tl.load(flags_ptr + offs, mask=ok_mask, other=0, volatile=True)
        missing = tl.sum(((f != epoch) & ok_mask).to(tl.int32), axis=0)
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [missing], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _preload(w_ptr, N, K, pid, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr):
    """Plain loads of the first TILES weight tiles of this program's first block, issued before
    the program waits; the caller consumes the registers after the wait (so the loads overlap it)
    and the phase then reads the same bytes again from L2."""
    offs_n = (pid * tl.cdiv(N, BLOCK_N) // tl.num_programs(0)) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k = tl.arange(0, TILES * BLOCK_K)
    return tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :],
                   mask=n_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _phase(x_ptr, X_FRESH: tl.constexpr, w_ptr, N, K, out_ptr, pid, G,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[n] = sum_k W[n, k] x[k] for this program's contiguous range of BLOCK_N-row blocks
    (balanced to +-1 block), M = 1. One pipelined loop over all (block, k-tile) pairs of the
    range, so the load pipeline does not drain between blocks."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    first = pid * n_blocks // G
    last = (pid + 1) * n_blocks // G
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in tl.range(first * k_tiles, last * k_tiles, num_stages=NUM_STAGES):
        blk = t // k_tiles
        kt = t - blk * k_tiles
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = kt * BLOCK_K + offs_k
        k_ok = k < K
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        x = _load_x(x_ptr, k, k_ok, X_FRESH)
        acc += w.to(tl.float32) * x[None, :]
        if kt == k_tiles - 1:
            out = tl.sum(acc, axis=1)
            tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)


@triton.jit
def _handoff(flags_ptr, pid, G, epoch, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRELOAD: tl.constexpr, BARRIER: tl.constexpr, MAX_G: tl.constexpr):
    """Phase boundary: arrive, preload the next weights, wait for every program."""
    keep = 0.0
    if BARRIER:
        _arrive(flags_ptr, pid, epoch)
    if PRELOAD > 0:
        pre = _preload(w_ptr, N, K, pid, BLOCK_N, BLOCK_K, PRELOAD)
    if BARRIER:
        _wait_all(flags_ptr, G, epoch, MAX_G)
    if PRELOAD > 0:
        keep += tl.sum(tl.sum(pre.to(tl.float32), axis=1), axis=0)
    return keep


@triton.jit
def _chain_kernel(x_ptr, wo_ptr, wgu_ptr, wd_ptr, wqkv_ptr, out_ptr, act_ptr, flags_ptr, epoch_ptr, sink_ptr,
                  H, I2, I1, NQ, KO,
                  BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_D: tl.constexpr, BN_Q: tl.constexpr,
                  BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, PRELOAD: tl.constexpr,
                  BARRIER: tl.constexpr, MAX_G: tl.constexpr):
    """One layer's four GEMMs; BARRIER 0 skips the waits (wrong results: the streaming bound)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch = tl.load(epoch_ptr + pid) + 1
    a = act_ptr  # fp32 vectors between phases
    b = act_ptr + H
    c = act_ptr + H + I2
    _phase(x_ptr, False, wo_ptr, H, KO, a, pid, G, BN_O, BLOCK_K, NUM_STAGES)
    keep = _handoff(flags_ptr, pid, G, epoch, wgu_ptr, I2, H, BN_GU, BLOCK_K, PRELOAD, BARRIER, MAX_G)
    _phase(a, True, wgu_ptr, I2, H, b, pid, G, BN_GU, BLOCK_K, NUM_STAGES)
    keep += _handoff(flags_ptr + MAX_G, pid, G, epoch, wd_ptr, H, I1, BN_D, BLOCK_K, PRELOAD, BARRIER, MAX_G)
    _phase(b, True, wd_ptr, H, I1, c, pid, G, BN_D, BLOCK_K, NUM_STAGES)
    keep += _handoff(flags_ptr + 2 * MAX_G, pid, G, epoch, wqkv_ptr, NQ, H, BN_Q, BLOCK_K, PRELOAD, BARRIER, MAX_G)
    _phase(c, True, wqkv_ptr, NQ, H, out_ptr, pid, G, BN_Q, BLOCK_K, NUM_STAGES)
    if keep == 12345.678:  # never true for these weights: keeps the preloads alive
        tl.store(sink_ptr, keep)
    tl.store(epoch_ptr + pid, epoch)


class Layer:
    """One layer's weights at one rank's shapes."""

    def __init__(self, tp: int, gen: torch.Generator) -> None:
        def w(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, device="cuda", generator=gen) * (1.0 / k ** 0.5)).to(torch.bfloat16)

        self.o = w(HIDDEN, HIDDEN // tp)
        self.gate_up = w(2 * INTER // tp, HIDDEN)
        self.down = w(HIDDEN, INTER // tp)
        self.qkv = w(QKV // tp, HIDDEN)


def reference(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """fp32 chain on the same bf16 weights (the persistent kernel keeps fp32 between phases)."""
    o = layer.o.float() @ x.float()
    gu = layer.gate_up.float() @ o
    d = layer.down.float() @ gu[: layer.down.shape[1]]
    return layer.qkv.float() @ d


class Chain:
    """The persistent launch for one layer, with its scratch vectors, flags and per-program epochs."""

    def __init__(self, tp: int, sms: int, block_k: int, stages: int, preload: int, bn: tuple[int, int, int, int],
                 warps: int = 4, barrier: int = 1):
        self.tp, self.sms, self.block_k, self.stages, self.preload, self.bn = tp, sms, block_k, stages, preload, bn
        self.warps = warps
        self.act = torch.zeros(HIDDEN + 2 * INTER // tp + HIDDEN, dtype=torch.float32, device="cuda")
        self.max_g = triton.next_power_of_2(sms)
        self.flags = torch.zeros(3 * self.max_g, dtype=torch.int32, device="cuda")
        self.epochs = torch.zeros(sms, dtype=torch.int32, device="cuda")
        self.barrier = barrier
        self.sink = torch.zeros(1, dtype=torch.float32, device="cuda")

    def __call__(self, x: torch.Tensor, layer: Layer, out: torch.Tensor) -> torch.Tensor:
        bn_o, bn_gu, bn_d, bn_q = self.bn
        _chain_kernel[(self.sms,)](
            x, layer.o, layer.gate_up, layer.down, layer.qkv, out, self.act, self.flags, self.epochs, self.sink,
            HIDDEN, 2 * INTER // self.tp, INTER // self.tp, QKV // self.tp, HIDDEN // self.tp,
            BN_O=bn_o, BN_GU=bn_gu, BN_D=bn_d, BN_Q=bn_q, BLOCK_K=self.block_k,
            NUM_STAGES=self.stages, PRELOAD=self.preload, BARRIER=self.barrier, MAX_G=self.max_g, num_warps=self.warps, num_stages=self.stages,
        )
        return out


def separate(x: torch.Tensor, layer: Layer, out: torch.Tensor) -> torch.Tensor:
    """The same four GEMMs as four tuned skinny-GEMM launches (bf16 between them)."""
    o = tg.skinny_linear(x, layer.o)
    gu = tg.skinny_linear(o, layer.gate_up)
    d = tg.skinny_linear(gu[:, : layer.down.shape[1]], layer.down)
    out.copy_(tg.skinny_linear(d, layer.qkv))
    return out


def time_graph(fn, xs: list[torch.Tensor], layers: list[Layer], outs: list[torch.Tensor], replays: int) -> float:
    for _ in range(2):  # tune / compile outside the capture
        for x, layer, out in zip(xs, layers, outs):
            fn(x, layer, out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x, layer, out in zip(xs, layers, outs):
            fn(x, layer, out)
    return median_replay_us(graph, replays, warm_ups=2) / 1e3


def run_tp(tp: int, replays: int, sms: int) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda").manual_seed(tp)
    layers = [Layer(tp, gen) for _ in range(LAYERS)]
    nbytes = sum(t.numel() * 2 for layer in layers for t in (layer.o, layer.gate_up, layer.down, layer.qkv))
    xs = [torch.randn(1, HIDDEN // tp, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
    outs = [torch.empty(1, QKV // tp, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    rows = []

    def record(name: str, fn) -> None:
        ref = reference(xs[0][0], layers[0])
        fn(xs[0], layers[0], outs[0])
        torch.cuda.synchronize()
        err = ((outs[0][0].float() - ref).abs().max() / ref.abs().max()).item()
        try:
            ms = time_graph(fn, xs, layers, outs, replays)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            print(f"TP={tp} {name}: failed: {exc}", flush=True)
            rows.append({"tp": tp, "variant": name, "error": str(exc)})
            return
        # Correct after the graph ran too (epochs advanced through many launches).
        fn(xs[0], layers[0], outs[0])
        torch.cuda.synchronize()
        err2 = ((outs[0][0].float() - ref).abs().max() / ref.abs().max()).item()
        row = {"tp": tp, "variant": name, "ms_per_32_layers": ms, "tb_per_s": nbytes / ms / 1e9,
               "rel_error": err, "rel_error_after_graph": err2, "ok": max(err, err2) < 2e-2}
        print(row, flush=True)
        rows.append(row)

    record("separate skinny_linear x4", separate)
    # (BLOCK_K, stages, warps, programs per SM, preload tiles, BLOCK_N per phase O/gate_up/down/QKV)
    # (BLOCK_K, stages, warps, programs per SM, preload tiles, BLOCK_N per phase, barrier)
    variants = [
        (512, 4, 8, 1, 0, (32, 32, 32, 32), 0),
        (512, 4, 8, 1, 0, (32, 32, 32, 32), 1),
        (512, 4, 8, 1, 1, (32, 32, 32, 32), 1),
        (512, 3, 4, 2, 0, (16, 16, 16, 16), 0),
        (512, 3, 4, 2, 0, (16, 16, 16, 16), 1),
        (512, 3, 4, 2, 1, (16, 16, 16, 16), 1),
        (256, 6, 8, 1, 0, (64, 64, 64, 64), 0),
        (256, 6, 8, 1, 0, (64, 64, 64, 64), 1),
    ]
    for block_k, stages, warps, per_sm, preload, bn, barrier in variants:
        chain = Chain(tp, per_sm * sms, block_k, stages, preload, bn, warps, barrier)
        record(f"persistent BK={block_k} st={stages} w={warps} {per_sm}/SM pre={preload} bn={bn[0]} bar={barrier}",
               chain)
    del layers
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        rows += run_tp(tp, args.replays, sms)
    print(f"\n{torch.cuda.get_device_name(0)}, {sms} SMs; ms per 32 layers of the 4 decode GEMMs (M=1, bf16)")
    print(f"{'TP':>3} {'variant':64} {'ms':>8} {'TB/s':>6} {'ok':>4}")
    for row in rows:
        if "error" in row:
            print(f"{row['tp']:>3} {row['variant']:64} failed")
        else:
            print(f"{row['tp']:>3} {row['variant']:64} {row['ms_per_32_layers']:8.3f} {row['tb_per_s']:6.2f} "
                  f"{str(row['ok']):>4}")
    write_results({"device": torch.cuda.get_device_name(0), "rows": rows}, "persistent_chain.json")


if __name__ == "__main__":
    main()
