"""Prefix caching measurements: parallel-sampling memory, shared-prefix speedup, no-sharing overhead.

Run (CPU, a tiny random model built on the fly):
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --max-num-seqs 64
Run (GPU, Qwen3-0.6B dimensions, random weights; the T1 request set for the overhead case):
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --model benchmarks/configs/qwen3-0.6b \
        --load-format dummy --no-sharing-workload t1

Cases (--cases, default all):
  parallel      n=4 samples of one prompt (512 tokens, 128 output): peak KV blocks held, with
                caching (the samples share the prompt) vs without (four independent requests).
  shared        256 requests = one common 1024-token system prompt + a unique 64-token question,
                64 output tokens each: throughput and mean time to first token, caching on vs off.
  no-sharing    random prompts that share nothing: throughput with caching on vs off (T1 with
                --no-sharing-workload t1; else 128 requests, prompts 64-512, outputs 32-128).
Each engine is built fresh, warmed up on unrelated tokens, timed on the workload, then released.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

# A tiny Llama with SmolLM2-135M's shape ratios (grouped-query attention with head_dim 64, MLP 3x
# hidden), so that, as in real models, the MLP and projections cost more per token than reading
# the KV cache does. (A test-size model, hidden 64, is all attention: there, decode attention
# over the shared 1024-token prefix, gathered for each sequence, dominates with or without
# caching.)
TINY_CPU_MODEL: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 256,
    "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False,
}


def make_llm(args: argparse.Namespace, enable_prefix_caching: bool, max_model_len: int) -> Any:
    """A fresh engine for one measurement."""
    from pagedllm import LLM

    extra: dict[str, Any] = {}
    if args.num_gpu_blocks_override is not None:
        extra["num_gpu_blocks_override"] = args.num_gpu_blocks_override
    if args.max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_memory_bytes is not None:
        extra["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    return LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, dtype=args.dtype,
               device=args.device, max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
               enable_prefix_caching=enable_prefix_caching, enforce_eager=args.enforce_eager,
               gpu_memory_utilization=args.gpu_memory_utilization, **extra)


def measure(args: argparse.Namespace, enable_prefix_caching: bool, max_model_len: int,
            run: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Build an engine, run one measurement on it, then release it (and its KV pool) before the next."""
    import torch

    llm = make_llm(args, enable_prefix_caching, max_model_len)
    try:
        return run(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vocab_size(llm: Any) -> int:
    """Token ids are drawn from [3, vocab_size) so no special token is hit."""
    return llm.llm_engine.config.model_config.vocab_size


def warm_up(llm: Any) -> None:
    """A few requests of assorted lengths on a token no workload uses, so lazy initialisation
    (kernel compilation for each prefill shape) is not timed."""
    from pagedllm import SamplingParams

    max_len = llm.llm_engine.config.model_config.max_model_len
    prompts = [{"prompt_token_ids": [3] * min(n, max_len - 8)} for n in (40, 300, 1000, 2000)]
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)


def run_batch(llm: Any, prompts: list[list[int]], output_lens: list[int], temperature: float = 0.0
              ) -> dict[str, float]:
    """Generate everything at once; throughput and mean time to first token."""
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=temperature, top_p=1.0, max_tokens=n, ignore_eos=True)
              for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_prompt = sum(len(p) for p in prompts)
    ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs
             if o.metrics is not None and o.metrics.first_token_time is not None]
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    return {"seconds": elapsed, "output_tok_s": num_output / elapsed,
            "total_tok_s": (num_output + num_prompt) / elapsed,
            "mean_ttft_s": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
            "cached_tokens": sum(o.num_cached_tokens for o in outputs),
            "prefix_cache_hit_rate": stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1)}


def bench_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """Peak KV blocks of n=4 samples with caching (shared prompt) vs without (independent)."""
    from pagedllm import SamplingParams

    prompt_len, output_len, n = 512, 128, 4

    def run(llm: Any) -> dict[str, Any]:
        rng = random.Random(1)
        prompt = [rng.randrange(3, vocab_size(llm)) for _ in range(prompt_len)]
        engine = llm.llm_engine
        manager = engine.engine_core.kv_cache_manager
        engine.add_request("parallel", {"prompt_token_ids": prompt},
                           SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=output_len, ignore_eos=True))
        peak = 0
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak, manager.num_blocks - manager.num_free_blocks)
        return {"peak_blocks": peak, "allocated_blocks": manager.block_pool.num_allocated_blocks}

    max_model_len = prompt_len + output_len + 16
    result: dict[str, Any] = {"prompt_len": prompt_len, "output_len": output_len, "n": n,
                              "independent": measure(args, False, max_model_len, run),
                              "shared": measure(args, True, max_model_len, run)}
    result["peak_ratio"] = result["shared"]["peak_blocks"] / result["independent"]["peak_blocks"]
    return result


def bench_shared(args: argparse.Namespace) -> dict[str, Any]:
    """One system prompt shared by every request: throughput and TTFT, caching on vs off."""
    def run(llm: Any) -> dict[str, Any]:
        rng = random.Random(2)
        vocab = vocab_size(llm)
        system = [rng.randrange(4, vocab) for _ in range(args.system_len)]
        prompts = [system + [rng.randrange(4, vocab) for _ in range(args.question_len)]
                   for _ in range(args.shared_requests)]
        warm_up(llm)
        return run_batch(llm, prompts, [args.shared_output_len] * len(prompts))

    max_model_len = args.system_len + args.question_len + args.shared_output_len + 16
    result: dict[str, Any] = {"num_requests": args.shared_requests, "system_len": args.system_len,
                              "question_len": args.question_len, "output_len": args.shared_output_len,
                              "caching_off": measure(args, False, max_model_len, run),
                              "caching_on": measure(args, True, max_model_len, run)}
    result["speedup"] = result["caching_off"]["seconds"] / result["caching_on"]["seconds"]
    result["ttft_ratio"] = result["caching_on"]["mean_ttft_s"] / result["caching_off"]["mean_ttft_s"]
    return result


def no_sharing_requests(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts that share nothing: exactly T1 (shared/BENCHMARKS.md), or a smaller set for the CPU."""
    prompts, output_lens = [], []
    if args.no_sharing_workload == "t1":
        random.seed(0)
        for _ in range(256):
            prompt_len = random.randint(100, 1024)
            output_lens.append(random.randint(100, 1024))
            prompts.append([random.randint(0, 9999) for _ in range(prompt_len)])
        return prompts, output_lens
    rng = random.Random(0)
    for _ in range(args.no_sharing_requests):
        prompt_len = rng.randint(64, 512)
        output_lens.append(rng.randint(32, 128))
        prompts.append([rng.randrange(4, vocab) for _ in range(prompt_len)])
    return prompts, output_lens


def bench_no_sharing(args: argparse.Namespace) -> dict[str, Any]:
    """Nothing shared: caching on should cost (almost) nothing. Alternates off / on; best of each."""
    t1 = args.no_sharing_workload == "t1"
    max_model_len = 4096 if t1 else 512
    temperature = 0.6 if t1 else 0.0
    runs: dict[str, list[dict[str, float]]] = {"caching_off": [], "caching_on": []}
    def run(llm: Any) -> dict[str, Any]:
        prompts, output_lens = no_sharing_requests(args, vocab_size(llm))
        warm_up(llm)
        return run_batch(llm, prompts, output_lens, temperature)

    for _ in range(args.repeats):
        for caching in (False, True):
            runs["caching_on" if caching else "caching_off"].append(measure(args, caching, max_model_len, run))
    result: dict[str, Any] = {"workload": args.no_sharing_workload, "repeats": args.repeats}
    for key, values in runs.items():
        result[key] = max(values, key=lambda r: r["total_tok_s"])
        result[key + "_all_output_tok_s"] = [r["output_tok_s"] for r in values]
    result["relative_throughput"] = result["caching_on"]["output_tok_s"] / result["caching_off"]["output_tok_s"]
    return result


def main() -> None:
    """Parse flags, run the chosen cases, print (and optionally save) the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: a tiny random Llama built on the fly)")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cases", default="parallel,shared,no-sharing")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="CPU KV pool (default 2 GiB)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--shared-requests", type=int, default=256)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--shared-output-len", type=int, default=64)
    parser.add_argument("--no-sharing-workload", choices=["small", "t1"], default="small")
    parser.add_argument("--no-sharing-requests", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="no-sharing runs per setting (best counts)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.model is None:
        args.model = tempfile.mkdtemp(prefix="pagedllm-bench-")
        with open(os.path.join(args.model, "config.json"), "w") as f:
            json.dump(TINY_CPU_MODEL, f)
    cases = {"parallel": bench_parallel, "shared": bench_shared, "no-sharing": bench_no_sharing}
    results: dict[str, Any] = {"model": args.model, "device": args.device}
    for name in args.cases.split(","):
        results[name] = cases[name](args)
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
