"""Check and time the fused Triton layer kernels (RMSNorm + residual, rotary, SiLU/GELU-and-mul).

    PYTHONPATH=src python benchmarks/bench_fused_gpu.py [--iters 200] [--batches 1,64,256]
                                                        [--no-model-step] [--context 512]

1. Correctness: every fused kernel in bf16 against the PyTorch layer run in fp32 on the same
   bf16 inputs (relative error < 1e-2), at each model's decode shapes; plus a CUDA-graph check:
   each kernel captured in a graph, its inputs changed in place, the replay equal to eager.
2. Kernel timing: fused vs unfused (the layer's `forward_native`, i.e. the torch ops the CUDA
   path ran before) at the decode shapes of Qwen3-0.6B and Llama-3.1-8B for batch 1, 64, 256,
   with an estimate of the GPU time saved per decode step (per-layer counts x layers), and the
   eager wall time per call (launch cost included).
3. Model step: one decode forward pass of each model (dummy weights, context --context tokens)
   replayed from a CUDA graph with fused kernels on and off, and run eagerly (wall time, so the
   host launch cost of Triton vs torch kernels shows, as in prefill steps or --enforce-eager).
Every variant is wrapped: a failure prints and the run continues. Prints a table last and writes
everything to $OUT/fused_kernels.json when OUT is set. Needs only torch and triton.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_attention_gpu import Timer, attempt, rel_error  # noqa: E402
from gpu_check import write_results  # noqa: E402

from pagedllm.layers import triton_fused as tf  # noqa: E402
from pagedllm.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from pagedllm.layers.layernorm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters  # noqa: E402

DEVICE = torch.device("cuda")
CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
MAX_REL_ERROR = 1e-2


@dataclass
class Shapes:
    """The decode-step shapes of one model."""

    name: str
    config_dir: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int
    eps: float
    qk_norm: bool
    rope: dict[str, Any]


def load_shapes(name: str, config_dir: str) -> Shapes:
    """Shapes of a model from its config.json in benchmarks/configs."""
    with open(os.path.join(CONFIGS, config_dir, "config.json")) as f:
        c = json.load(f)
    return Shapes(
        name=name, config_dir=config_dir, hidden=c["hidden_size"], num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        intermediate=c["intermediate_size"], num_layers=c["num_hidden_layers"], eps=c["rms_norm_eps"],
        qk_norm=c["model_type"] in ("qwen3", "qwen3_moe"), rope=rope_parameters(c),
    )


@dataclass
class Op:
    """One fused layer op at one shape: fused and native callables plus the correctness check."""

    name: str
    per_layer: int  # how often a decoder layer runs it
    fused: Callable[[], Any]
    native: Callable[[], Any]
    # Relative errors vs the native layer in fp32: (fused bf16, native bf16); the native bf16
    # error is the floor that the output rounding alone gives.
    check: Callable[[], tuple[float, float]]
    graph_check: Callable[[], bool]  # captured replay == eager after the inputs changed


def _rel(outs: Any, refs: Any) -> float:
    """Largest relative error over matching outputs (tensors or tuples of tensors)."""
    if isinstance(outs, torch.Tensor):
        outs, refs = (outs,), (refs,)
    return max(rel_error(o, r.float()) for o, r in zip(outs, refs))


def _errors(fused: Callable[[], Any], native: Callable[[], Any], reference: Callable[[], Any]) -> tuple[float, float]:
    """(fused, native) relative errors against the fp32 reference."""
    expected = reference()
    return _rel(fused(), expected), _rel(native(), expected)


def _graph_check(fn: Callable[[], Any], inputs: list[torch.Tensor], in_place: list[torch.Tensor] = ()) -> bool:
    """Capture fn in a CUDA graph, refill its inputs, replay and compare with an eager call.

    `in_place` lists tensors fn modifies (checked instead of its return value; restored between
    the replay and the eager call)."""
    torch.cuda.synchronize()
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    for t in inputs:
        t.copy_(torch.randn_like(t.float()).to(t.dtype) if t.is_floating_point() else t.flip(0))
    saved = [t.clone() for t in in_place]
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in in_place] if in_place else (
        [c.clone() for c in captured] if isinstance(captured, tuple) else [captured.clone()])
    for t, s in zip(in_place, saved):
        t.copy_(s)
    eager = fn()
    expected = list(in_place) if in_place else (list(eager) if isinstance(eager, tuple) else [eager])
    return all(torch.equal(a, b) for a, b in zip(replayed, expected))


def _norm(hidden: int, eps: float, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, eps).to(DEVICE)
    norm.weight.data = (1.0 + 0.1 * torch.randn(hidden, generator=gen, device=DEVICE)).to(dtype)
    return norm


def make_ops(s: Shapes, batch: int, dtype: torch.dtype = torch.bfloat16) -> list[Op]:
    """The fused ops of one decoder layer of model `s` at a decode batch of `batch` tokens."""
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    ops: list[Op] = []

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    # RMSNorm with the residual add (input and post-attention layernorm).
    norm = _norm(s.hidden, s.eps, dtype, gen)
    norm32 = _norm(s.hidden, s.eps, torch.float32, gen)
    norm32.weight.data.copy_(norm.weight.float())
    x, residual = randn(batch, s.hidden), randn(batch, s.hidden)
    ops.append(Op(
        "add_rms_norm", 2,
        fused=lambda: tf.fused_add_rms_norm(x, residual, norm.weight, s.eps),
        native=lambda: norm.forward_native(x, residual),
        check=lambda: _errors(lambda: tf.fused_add_rms_norm(x, residual, norm.weight, s.eps),
                              lambda: norm.forward_native(x, residual),
                              lambda: norm32.forward_native(x.float(), residual.float())),
        graph_check=lambda: _graph_check(lambda: tf.fused_add_rms_norm(x, residual, norm.weight, s.eps),
                                         [x, residual]),
    ))

    # q / k views of one fused QKV output, as LlamaAttention makes them.
    q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    qkv = randn(batch, q_size + 2 * kv_size)
    q = qkv[:, :q_size].view(batch, s.num_heads, s.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(batch, s.num_kv_heads, s.head_dim)
    if s.qk_norm:
        head_norm = _norm(s.head_dim, s.eps, dtype, gen)
        head_norm32 = _norm(s.head_dim, s.eps, torch.float32, gen)
        head_norm32.weight.data.copy_(head_norm.weight.float())
        ops.append(Op(
            "qk_rms_norm", 2,
            fused=lambda: tf.rms_norm(q, head_norm.weight, s.eps),
            native=lambda: head_norm.forward_native(q),
            check=lambda: _errors(lambda: tf.rms_norm(q, head_norm.weight, s.eps),
                                  lambda: head_norm.forward_native(q),
                                  lambda: head_norm32.forward_native(q.float())),
            graph_check=lambda: _graph_check(lambda: tf.rms_norm(q, head_norm.weight, s.eps), [qkv]),
        ))

    rotary = RotaryEmbedding(s.head_dim, s.head_dim, 8192, s.rope).to(DEVICE)
    positions = torch.randint(0, 8192, (batch,), generator=gen, device=DEVICE)

    def rotary_fused() -> tuple[torch.Tensor, torch.Tensor]:
        saved = qkv.clone()
        tf.rotary_embedding_(positions, q, k, rotary.cos_cache, rotary.sin_cache, s.head_dim)
        out = (q.clone(), k.clone())
        qkv.copy_(saved)
        return out

    def rotary_check() -> tuple[float, float]:
        return _errors(rotary_fused, lambda: rotary.forward_native(positions, q, k),
                       lambda: rotary.forward_native(positions, q.float(), k.float()))

    ops.append(Op(
        "rotary", 1,
        fused=lambda: tf.rotary_embedding_(positions, q, k, rotary.cos_cache, rotary.sin_cache, s.head_dim),
        native=lambda: rotary.forward_native(positions, q, k),
        check=rotary_check,
        graph_check=lambda: _graph_check(
            lambda: tf.rotary_embedding_(positions, q, k, rotary.cos_cache, rotary.sin_cache, s.head_dim),
            [positions], in_place=[qkv]),
    ))

    gate_up = randn(batch, 2 * s.intermediate)
    for name, layer, fused, per_layer in (
        ("silu_and_mul", SiluAndMul(), tf.silu_and_mul, 1),
        # Not used by these models (GeGLU, e.g. Gemma): timed at the same shape for reference.
        ("gelu_tanh_and_mul", GeluAndMul("tanh"), tf.gelu_tanh_and_mul, 0),
    ):
        ops.append(Op(
            name, per_layer,
            fused=lambda fused=fused: fused(gate_up),
            native=lambda layer=layer: layer.forward_native(gate_up),
            check=lambda fused=fused, layer=layer: _errors(lambda: fused(gate_up), lambda: layer.forward_native(gate_up),
                                                           lambda: layer.forward_native(gate_up.float())),
            graph_check=lambda fused=fused: _graph_check(lambda: fused(gate_up), [gate_up]),
        ))
    return ops


def host_time_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Wall time per call of back-to-back eager calls: the larger of launch cost and GPU time."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def bench_kernels(shapes: list[Shapes], batches: list[int], timer: Timer) -> list[dict[str, Any]]:
    """Correctness and fused-vs-native timing of every op at every (model, batch)."""
    rows = []
    for s in shapes:
        for batch in batches:
            ops = attempt(f"{s.name} batch {batch}: build inputs", lambda: make_ops(s, batch))
            for op in ops or []:
                label = f"{s.name} b={batch} {op.name}"
                row: dict[str, Any] = {"model": s.name, "batch": batch, "op": op.name, "per_layer": op.per_layer,
                                       "num_layers": s.num_layers}
                row["rel_error"], row["native_rel_error"] = attempt(f"{label} check", op.check) or (None, None)
                row["ok"] = row["rel_error"] is not None and row["rel_error"] < MAX_REL_ERROR
                row["graph_ok"] = attempt(f"{label} graph", op.graph_check)
                row["fused_us"] = attempt(f"{label} fused", lambda: timer(op.fused) * 1e3)
                row["native_us"] = attempt(f"{label} native", lambda: timer(op.native) * 1e3)
                # Eager mode (prefill steps, --enforce-eager) also pays the host launch cost.
                row["fused_host_us"] = attempt(f"{label} fused host", lambda: host_time_us(op.fused))
                row["native_host_us"] = attempt(f"{label} native host", lambda: host_time_us(op.native))
                print(f"  {label:<40} rel_err {_fmt(row['rel_error'], '.1e')} "
                      f"(torch bf16 {_fmt(row['native_rel_error'], '.1e')})  graph {row['graph_ok']}  "
                      f"fused {_fmt(row['fused_us'])} us  torch {_fmt(row['native_us'])} us  (eager wall "
                      f"{_fmt(row['fused_host_us'])} / {_fmt(row['native_host_us'])} us)", flush=True)
                rows.append(row)
    return rows


def bench_model_step(s: Shapes, batches: list[int], context: int, iters: int) -> list[dict[str, Any]]:
    """Decode forward pass of the whole model (dummy weights) from a CUDA graph, fused on vs off."""
    from pagedllm.attention import triton_backend
    from pagedllm.attention.metadata import AttentionMetadata
    from pagedllm.config import EngineArgs, create_engine_config
    from pagedllm.layers.custom_op import set_fused_kernels
    from pagedllm.loader import get_model

    config = create_engine_config(EngineArgs(model=os.path.join(CONFIGS, s.config_dir), load_format="dummy",
                                             skip_tokenizer_init=True, max_model_len=context + 16))
    model = get_model(config.model_config, DEVICE)
    dtype = getattr(torch, config.model_config.dtype)
    block_size = 16
    max_batch = max(batches)
    blocks_per_seq = -(-(context + 1) // block_size)
    num_blocks = max_batch * blocks_per_seq + 1
    for layer in model.attention_layers():
        layer.kv_cache = torch.randn(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                     device=DEVICE, dtype=dtype) * 0.1
    rows = []
    for batch in batches:
        gen = torch.Generator(device=DEVICE).manual_seed(batch)
        tables = torch.randperm(num_blocks - 1, generator=gen, device=DEVICE)[: batch * blocks_per_seq] + 1
        tables = tables.view(batch, blocks_per_seq)
        positions = torch.full((batch,), context, dtype=torch.long, device=DEVICE)
        metadata = AttentionMetadata(
            num_actual_tokens=batch, num_decodes=batch,
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.full((batch,), context + 1, dtype=torch.long, device=DEVICE),
            slot_mapping=tables[:, context // block_size] * block_size + context % block_size,
            block_tables=tables, max_query_len=1, max_seq_len=context + 1,
            query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[context + 1] * batch,
            num_kv_splits=triton_backend.choose_num_kv_splits(batch, s.num_kv_heads, context + 1,
                                                              triton_backend.num_sms(DEVICE)),
        )
        input_ids = torch.randint(0, 1000, (batch,), generator=gen, device=DEVICE)
        row: dict[str, Any] = {"model": s.name, "batch": batch, "context": context}
        outputs = {}
        for fused in (False, True):
            def run(fused: bool = fused) -> float:
                set_fused_kernels(model, fused)
                with torch.inference_mode():
                    for _ in range(2):
                        model(input_ids, positions, metadata)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = model(input_ids, positions, metadata)
                graph.replay()
                torch.cuda.synchronize()
                outputs[fused] = out.float().clone()
                times = []
                for _ in range(iters):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                del graph
                return statistics.median(times)

            def eager(fused: bool = fused) -> float:
                set_fused_kernels(model, fused)
                with torch.inference_mode():
                    return host_time_us(lambda: model(input_ids, positions, metadata), calls=20) / 1e3

            name = "fused" if fused else "native"
            row[f"{name}_ms"] = attempt(f"{s.name} step b={batch} fused={fused}", run)
            row[f"{name}_eager_ms"] = attempt(f"{s.name} eager step b={batch} fused={fused}", eager)
        if len(outputs) == 2:
            row["hidden_rel_diff"] = rel_error(outputs[True], outputs[False])
        print(f"  {s.name} step b={batch}: torch {_fmt(row.get('native_ms'), '.3f')} ms  "
              f"fused {_fmt(row.get('fused_ms'), '.3f')} ms  hidden rel diff {_fmt(row.get('hidden_rel_diff'), '.1e')}  "
              f"(eager: torch {_fmt(row.get('native_eager_ms'), '.3f')} ms, fused {_fmt(row.get('fused_eager_ms'), '.3f')} ms)",
              flush=True)
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(kernels: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    """One table of kernel timings and per-step savings, then the model-step table."""
    print("\n| model | batch | op | rel err (< 1e-2) | torch bf16 rel err | graph | torch us | fused us | speedup "
          "| eager wall torch / fused us |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    saved: dict[tuple[str, int], float] = {}
    for r in kernels:
        speedup = r["native_us"] / r["fused_us"] if r["fused_us"] and r["native_us"] else None
        print(f"| {r['model']} | {r['batch']} | {r['op']} | {_fmt(r['rel_error'], '.1e')} "
              f"{'ok' if r['ok'] else 'FAIL'} | {_fmt(r['native_rel_error'], '.1e')} | {r['graph_ok']} | {_fmt(r['native_us'])} | {_fmt(r['fused_us'])} "
              f"| {_fmt(speedup, '.2f')}x | {_fmt(r['native_host_us'])} / {_fmt(r['fused_host_us'])} |")
        if speedup is not None:
            key = (r["model"], r["batch"])
            saved[key] = saved.get(key, 0.0) + (r["native_us"] - r["fused_us"]) * r["per_layer"] * r["num_layers"]
    print("\nEstimated GPU time saved per decode step (kernel times x uses per layer x layers):")
    for (model, batch), us in saved.items():
        print(f"  {model} batch {batch}: {us / 1e3:.3f} ms")
    if steps:
        print("\n| model | batch | context | graph step torch ms | graph step fused ms | speedup "
              "| eager step torch / fused ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in steps:
            speedup = r["native_ms"] / r["fused_ms"] if r.get("fused_ms") and r.get("native_ms") else None
            print(f"| {r['model']} | {r['batch']} | {r['context']} | {_fmt(r.get('native_ms'), '.3f')} "
                  f"| {_fmt(r.get('fused_ms'), '.3f')} | {_fmt(speedup, '.2f')}x "
                  f"| {_fmt(r.get('native_eager_ms'), '.3f')} / {_fmt(r.get('fused_eager_ms'), '.3f')} |")
    failed = [r for r in kernels if not r["ok"] or r["graph_ok"] is not True]
    print(f"\ncorrectness: {len(kernels) - len(failed)} / {len(kernels)} ops pass (bf16 vs fp32, CUDA graph)")


def main() -> None:
    """Run checks and timings; print the tables and write $OUT/fused_kernels.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--models", default="qwen3-0.6b,llama-3.1-8b", help="directories under benchmarks/configs")
    ap.add_argument("--context", type=int, default=512, help="KV context of the model-step timing")
    ap.add_argument("--no-model-step", action="store_true", help="skip the whole-model CUDA-graph timing")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = [load_shapes(m, m) for m in args.models.split(",")]
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"device {results['device']}, torch {results['torch']}, triton {results.get('triton')}", flush=True)
    print("=== kernels (bf16)", flush=True)
    results["kernels"] = bench_kernels(shapes, batches, Timer(args.iters))
    results["model_step"] = []
    if not args.no_model_step:
        print("=== model decode step (CUDA graph replay)", flush=True)
        for s in shapes:
            results["model_step"] += attempt(f"{s.name} model step",
                                             lambda: bench_model_step(s, batches, args.context, args.iters)) or []
    print_summary(results["kernels"], results["model_step"])
    write_results(results, "fused_kernels.json")


if __name__ == "__main__":
    main()
