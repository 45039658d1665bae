"""Offline throughput: C1 (embedded model on CPU) and T1 (random lengths) against HF transformers.

`pagedllm bench throughput --num-prompts 32 --input-len 128 --output-len 128 --compare-hf`
prints one table with pagedllm and the Hugging Face `generate` baseline measured in the same run,
and writes JSON when `--output-json` is given.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from pagedllm.config import EngineArgs


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    """Workload and reporting flags of the throughput benchmark."""
    parser.add_argument("--workload", choices=["fixed", "t1"], default="fixed",
                        help="fixed: --num-prompts x (--input-len, --output-len); t1: BENCHMARKS.md T1 request set")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=str, default=None,
                        help="comma-separated concurrencies to run, e.g. 1,32 (default: --num-prompts)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--compare-hf", action="store_true", help="also time HF transformers generate")
    parser.add_argument("--hf-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the HF baseline (default: the same as pagedllm's)")
    parser.add_argument("--output-json", type=str, default=None)


def t1_requests() -> list[tuple[list[int], int]]:
    """The 256 T1 requests (prompt token ids, output length), drawn as shared/BENCHMARKS.md says."""
    random.seed(0)
    requests = []
    for _ in range(256):
        prompt_len = random.randint(100, 1024)
        output_len = random.randint(100, 1024)
        requests.append(([random.randint(0, 9999) for _ in range(prompt_len)], output_len))
    return requests


def make_requests(args: argparse.Namespace, num_prompts: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs of the chosen workload."""
    if args.workload == "t1":
        return t1_requests()[:num_prompts]
    rng = random.Random(0)
    return [([rng.randint(100, 9999) for _ in range(args.input_len)], args.output_len) for _ in range(num_prompts)]


def bench_pagedllm(llm: Any, requests: list[tuple[list[int], int]], temperature: float) -> dict[str, float]:
    """Output tokens per second of pagedllm for the whole batch (after a warm-up request)."""
    from pagedllm.sampling_params import SamplingParams

    warm = SamplingParams(max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": requests[0][0]}], warm, use_tqdm=False)
    params = [SamplingParams(temperature=temperature, top_p=1.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed}


def build_hf_model(engine_args: EngineArgs, dtype: str, device: str) -> Any:
    """An HF transformers model with exactly the weights pagedllm loads (dequantized for GGUF)."""
    import torch
    import transformers

    from pagedllm.config import create_engine_config
    from pagedllm.loader.model_loader import iter_weights

    config = create_engine_config(engine_args)
    mc = config.model_config
    hf_dict = dict(mc.hf_config)
    arch = mc.architectures[0]
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    hf_config = config_class(**{k: v for k, v in hf_dict.items() if not k.startswith("_")})
    with torch.device(device):
        model = getattr(transformers, arch)(hf_config).to(getattr(torch, dtype))
    if mc.load_format != "dummy":
        state = dict(iter_weights(mc))
        model.load_state_dict(state, strict=False)
        if hf_config.tie_word_embeddings:
            model.tie_weights()
    return model.eval()


def bench_hf(model: Any, requests: list[tuple[list[int], int]], batch_size: int) -> dict[str, float]:
    """HF `generate` in static batches (left-padded), counting only the useful output tokens."""
    import torch

    device = next(model.parameters()).device
    num_out = 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        max_prompt = max(len(p) for p, _ in chunk)
        max_new = max(n for _, n in chunk)
        ids = torch.zeros(len(chunk), max_prompt, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(chunk):
            ids[row, max_prompt - len(p):] = torch.tensor(p)
            mask[row, max_prompt - len(p):] = 1
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=max_new,
                           min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
        num_out += sum(n for _, n in chunk)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed}


def run_throughput_cli(args: argparse.Namespace) -> int:
    """Run the benchmark described by the CLI flags and print a table (pagedllm vs HF)."""
    import torch

    from pagedllm.entrypoints.llm import LLM

    engine_args = EngineArgs.from_cli_args(args)
    engine_args.skip_tokenizer_init = True
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.num_prompts]
    rows: list[dict[str, Any]] = []
    hf_model = None
    for batch in batch_sizes:
        requests = make_requests(args, batch)
        llm = LLM(**{**vars(engine_args), "max_num_seqs": max(batch, 1)})
        result = bench_pagedllm(llm, requests, args.temperature)
        dtype = llm.llm_engine.config.model_config.dtype
        device = llm.llm_engine.config.device
        del llm
        row = {"batch": batch, "requests": len(requests), "pagedllm_tok_s": result["output_tok_s"],
               "pagedllm_s": result["seconds"]}
        if args.compare_hf:
            if hf_model is None:
                hf_model = build_hf_model(engine_args, args.hf_dtype or dtype, device)
            bench_hf(hf_model, requests[:1], 1) if batch == batch_sizes[0] else None  # warm-up
            hf = bench_hf(hf_model, requests, batch)
            row.update(hf_tok_s=hf["output_tok_s"], hf_s=hf["seconds"], speedup=result["output_tok_s"] / hf["output_tok_s"])
        rows.append(row)
    info = {"model": engine_args.resolved_model(), "threads": torch.get_num_threads(), "workload": args.workload,
            "dtype": engine_args.dtype, "quantization": engine_args.quantization, "hf_dtype": args.hf_dtype,
            "input_len": args.input_len, "output_len": args.output_len, "rows": rows}
    print(f"model={info['model']} threads={info['threads']} workload={args.workload}")
    header = f"{'batch':>6} {'pagedllm tok/s':>15}" + (f" {'HF tok/s':>10} {'speedup':>8}" if args.compare_hf else "")
    print(header)
    for r in rows:
        line = f"{r['batch']:>6} {r['pagedllm_tok_s']:>15.1f}"
        if args.compare_hf:
            line += f" {r['hf_tok_s']:>10.1f} {r['speedup']:>7.2f}x"
        print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(info, f, indent=2)
    return 0
