"""The Llama decode megakernel (models/llama_megakernel.py) on one GPU: correctness against the
layer-by-layer path, then one decode step's time (CUDA graphs) both ways, at Llama-3.1-8B
dimensions with dummy weights.

    PYTHONPATH=src:. python benchmarks/bench_megakernel_gpu.py [--layers 32] [--context 128]

Correctness: a prompt is prefilled layer by layer, then every decode step runs both ways from
the same KV cache; the final hidden states, the new key/value written and the greedy token are
compared. Prints a table last and writes JSON to $OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.loader.model_loader import _initialize_dummy_weights, build_model, load_hf_config
from pagedllm.models import llama_megakernel

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "llama-3.1-8b")
BLOCK = 16


def metadata_for(positions: list[int], context: int, device: torch.device, max_blocks: int) -> AttentionMetadata:
    """One request whose tokens at `positions` are this step's (slots = positions: blocks in order)."""
    n = len(positions)
    seq_len = context + n
    decode = n == 1 and context > 0
    return AttentionMetadata(
        num_actual_tokens=n, num_decodes=1 if decode else 0,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([seq_len], dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(positions, dtype=torch.int64, device=device),
        block_tables=torch.arange(max_blocks, dtype=torch.int64, device=device)[None],
        max_query_len=n, max_seq_len=seq_len, query_start_loc_cpu=[0, n], seq_lens_cpu=[seq_len])


_KERNELS: dict[int, llama_megakernel.LlamaDecodeMegakernel] = {}


def use_megakernel(model, on: bool, **variant) -> None:
    """Route one-token steps through the megakernel (with `variant`'s knobs) or layer by layer."""
    inner = model.model
    inner._megakernel_decided = True
    mk = _KERNELS.setdefault(id(inner), llama_megakernel.LlamaDecodeMegakernel(inner))
    for key, value in variant.items():
        setattr(mk, key, value)
    inner._megakernel = mk if on else None


def build(layers: int, device: torch.device, max_len: int):
    config = load_hf_config(CONFIG)
    config = {**config, "num_hidden_layers": layers, "_max_model_len": max_len}
    model = build_model(config, torch.bfloat16, device)
    _initialize_dummy_weights(model, config, 0, torch.bfloat16, device)
    blocks = max_len // BLOCK
    for attn in model.attention_layers():
        attn.kv_cache = torch.zeros(2, blocks, BLOCK, attn.num_kv_heads, attn.head_dim, dtype=torch.bfloat16,
                                    device=device)
    return model, config


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.inference_mode()
def check(model, model32, device, context: int, steps: int, max_blocks: int, **variant) -> dict:
    """Decode `steps` tokens; at each, from the same cache: the layer path (bf16), the megakernel
    and the layer path in fp32 (model32, same weights). Errors are relative to the largest value."""
    torch.manual_seed(0)
    prompt = torch.randint(0, 128256, (context,), device=device)
    use_megakernel(model, False)
    hidden = model(prompt, torch.arange(context, device=device), metadata_for(list(range(context)), 0, device,
                                                                               max_blocks))
    token = model.compute_logits(hidden[-1:]).argmax(-1)
    res = {"err_vs_fp32_layers": 0.0, "err_vs_fp32_megakernel": 0.0, "err_megakernel_vs_layers": 0.0,
           "err_new_kv_vs_layers": 0.0, "greedy_agree": 0, "steps": steps}
    for step in range(steps):
        pos = context + step
        md = metadata_for([pos], pos, device, max_blocks)
        positions = torch.tensor([pos], dtype=torch.int64, device=device)
        caches = [a.kv_cache.clone() for a in model.attention_layers()]
        for a32, c in zip(model32.attention_layers(), caches):
            a32.kv_cache = c.float()
        try:
            ref32 = model32(token, positions, md)
        except Exception as e:  # noqa: BLE001 - the fp32 reference is a bonus
            print("fp32 reference failed:", e)
            ref32 = None
        use_megakernel(model, False)
        ref = model(token, positions, md)
        ref_k = [a.kv_cache[:, pos // BLOCK, pos % BLOCK].clone() for a in model.attention_layers()]
        for a, c in zip(model.attention_layers(), caches):
            a.kv_cache.copy_(c)
        use_megakernel(model, True, **variant)
        out = model(token, positions, md)
        torch.cuda.synchronize()
        if ref32 is not None:
            res["err_vs_fp32_layers"] = max(res["err_vs_fp32_layers"], rel_err(ref, ref32))
            res["err_vs_fp32_megakernel"] = max(res["err_vs_fp32_megakernel"], rel_err(out, ref32))
        res["err_megakernel_vs_layers"] = max(res["err_megakernel_vs_layers"], rel_err(out, ref))
        for a, rk in zip(model.attention_layers(), ref_k):
            res["err_new_kv_vs_layers"] = max(res["err_new_kv_vs_layers"],
                                              rel_err(a.kv_cache[:, pos // BLOCK, pos % BLOCK], rk))
        ref_tok, tok = model.compute_logits(ref).argmax(-1), model.compute_logits(out).argmax(-1)
        res["greedy_agree"] += int(ref_tok.item() == tok.item())
        token = tok
    return res


@torch.inference_mode()
def time_step(model, device, context: int, on: bool, max_blocks: int, reps: int = 50, **variant) -> float:
    use_megakernel(model, on, **variant)
    pos = context
    md = metadata_for([pos], pos, device, max_blocks)
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    positions = torch.tensor([pos], dtype=torch.int64, device=device)
    for _ in range(2):
        model(ids, positions, md)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(ids, positions, md)
    times = []
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def stamps(model, device, context: int, max_blocks: int, **variant) -> dict:
    """Where a layer's time goes, from the kernel's per-CTA global-timer stamps (us, mean over
    layers): each phase's span (median CTA), and how far apart the CTAs finish each phase."""
    use_megakernel(model, True, **variant)
    mk = model.model._megakernel
    mk.record_stamps(True)
    pos = context
    md = metadata_for([pos], pos, device, max_blocks)
    model(torch.zeros(1, dtype=torch.int64, device=device), torch.tensor([pos], device=device), md)
    torch.cuda.synchronize()
    s = mk.stamps.double()[:, :, :11] / 1e3  # [CTAs, layers, 11]
    mk.record_stamps(False)
    med = s.median(dim=0).values  # [layers, 11]
    spans = {"qkv_operand": (1, 0), "qkv_rows": (2, 1), "to_o_operand": (5, 2), "o_rows": (6, 5),
             "to_gu_operand": (7, 6), "gu_rows": (8, 7), "to_down_operand": (9, 8), "down_rows": (10, 9)}
    out = {name: (med[:, b] - med[:, a]).mean().item() for name, (b, a) in spans.items()}
    out["layer"] = (med[1:, 0] - med[:-1, 0]).mean().item()
    for name, i in (("qkv", 2), ("o", 6), ("gu", 8), ("down", 10)):
        done = s[:, :, i]
        out[f"finish_spread_{name}"] = (done.max(dim=0).values - done.min(dim=0).values).mean().item()
    attn = s[:, :, 4] - s[:, :, 3]
    out["attention_max"] = attn.max(dim=0).values.mean().item()
    return out


VARIANTS = {
    "static100_ahead2": dict(static_share=1.0, ahead=2),
    "static80_ahead2": dict(static_share=0.8, ahead=2),
    "static90_ahead2": dict(static_share=0.9, ahead=2),
    "static80_ahead3": dict(static_share=0.8, ahead=3),
    "static80_ahead0": dict(static_share=0.8, ahead=0),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--check-layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    device = torch.device("cuda")
    max_len, max_blocks = 2048, 2048 // BLOCK
    variants = args.variants.split(",")
    results: dict = {"device": torch.cuda.get_device_name(0)}
    model, _ = build(args.check_layers, device, max_len)
    print("unsupported:", llama_megakernel.unsupported_reason(model.model))
    model32 = copy.deepcopy(model).float()
    for name in ("static100_ahead2", "static80_ahead2"):
        results[f"check_{name}"] = check(model, model32, device, args.context, args.steps, max_blocks,
                                         **VARIANTS[name])
        print(f"check {name}", results[f"check_{name}"], flush=True)
    del model, model32
    _KERNELS.clear()
    torch.cuda.empty_cache()
    model, _ = build(args.layers, device, max_len)
    for ctx in (args.context + 256, 1024):
        row = {"layers": time_step(model, device, ctx, False, max_blocks)}
        for name in variants:
            row[name] = time_step(model, device, ctx, True, max_blocks, **VARIANTS[name])
        results[f"step_ms_ctx{ctx}"] = row
        print(f"ctx {ctx}:", {k: round(v, 3) for k, v in row.items()}, flush=True)
    for name in variants:
        results[f"stamps_{name}"] = stamps(model, device, args.context + 128, max_blocks, **VARIANTS[name])
        print(f"stamps {name} (us)", {k: round(v, 2) for k, v in results[f"stamps_{name}"].items()}, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "megakernel.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
