"""Pipeline parallelism on GPUs: greedy tokens of PP=2 (and TP=2 x PP=2 on 4 GPUs) against one
GPU, then L1 / T1 for several (TP, PP) layouts in one run.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \
        python benchmarks/bench_pp_gpu.py [--skip-check] [--l1 1x1,2x1,1x2] [--t1 1x1,1x2] [--no-micro-batching]
                                          [--no-async-scheduling] [--disable-custom-all-reduce] [--check-tp-groups small,large]
                                          [--l1-config llama-3.1-8b] [--t1-config qwen3-0.6b]

A layout is TPxPP. The check runs a tiny random Llama and Mixtral (fp32 and bf16) with CUDA
graphs for decode and for prefill steps of up to 64 (small) or 2048 (large) tokens, 16 prompts x
32 greedy tokens: a pipeline stage computes exactly what the same layers compute on one GPU, so
PP=2 must equal PP=1 in bf16 too. Prints a table last and writes $OUT/bench_pp.json (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_tp_gpu import RESULTS, copy_bandwidth_gbs, l1, print_table, t1  # noqa: E402
from gpu_check import record  # noqa: E402

STEPS = {  # name: (prompt lengths, step token budget, max_model_len)
    "small": ([1, 5, 16, 17, 33, 60, 100, 150] * 2, 64, 512),
    "large": ([300, 700, 1100, 1500, 90, 900, 1999, 450] * 2, 2048, 2048),
}


def greedy_tokens(path: str, prompts: list[list[int]], steps: str, **engine_kw) -> list[list[int]]:
    """32 greedy tokens of each prompt from an engine sized for step size `steps` (STEPS), with
    CUDA graphs for its prefill steps too."""
    from pagedllm import LLM, SamplingParams

    _, budget, max_len = STEPS[steps]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    with LLM(path, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 30, max_model_len=max_len, max_num_seqs=16,
             max_num_batched_tokens=budget, cuda_graph_max_prefill_tokens=budget, **engine_kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def check_tokens(archs: list[str], step_names: list[str]) -> dict:
    """Per model, step size and dtype: how many of 16 prompts' greedy tokens each layout shares
    with one GPU."""
    from tests.models.test_phi3_mixtral import CONFIGS as MOE_CONFIGS
    from tests.models.tiny_models import TINY_CONFIGS, build_tiny_model, random_prompts

    layouts = [(1, 2)] + ([(2, 2)] if torch.cuda.device_count() >= 4 else [])
    result = {}
    for arch in archs:
        configs = MOE_CONFIGS if arch in MOE_CONFIGS else TINY_CONFIGS
        with tempfile.TemporaryDirectory() as path:
            build_tiny_model(arch, path, configs={arch: {**configs[arch], "max_position_embeddings": 2048}})
            for steps in step_names:
                prompts = random_prompts(STEPS[steps][0], seed=3)
                # fp32 once (small steps), bf16 everywhere: the stages must give one GPU's bits.
                for dtype in ("float32", "bfloat16") if (arch, steps) == ("LlamaForCausalLM", "small") else ("bfloat16",):
                    tokens = {(tp, pp): greedy_tokens(path, prompts, steps, dtype=dtype, tensor_parallel_size=tp,
                                                      pipeline_parallel_size=pp)
                              for tp, pp in [(1, 1), *layouts]}
                    key = f"{arch}_{steps}_{dtype}"
                    result[key] = {f"tp{tp}pp{pp}_equals_tp1pp1": sum(a == b for a, b in zip(tokens[1, 1], tokens[tp, pp]))
                                   for tp, pp in layouts}
                    print(key, result[key], "of 16", flush=True)
    return result


def check_tp_groups(steps_names: list[str]) -> dict:
    """TP=2 x PP=2 on 4 GPUs, one step at a time (so every step's batch is TP=2's): its stages'
    all-reduces (symmetric memory per TP group, or NCCL) must give TP=2's bits in bf16."""
    from tests.models.tiny_models import TINY_CONFIGS, build_tiny_model, random_prompts

    arch = "LlamaForCausalLM"
    variants = {"tp2pp1": dict(pipeline_parallel_size=1), "tp2pp2": dict(pipeline_parallel_size=2),
                "tp2pp2_nccl": dict(pipeline_parallel_size=2, disable_custom_all_reduce=True)}
    result = {}
    with tempfile.TemporaryDirectory() as path:
        build_tiny_model(arch, path, configs={arch: {**TINY_CONFIGS[arch], "max_position_embeddings": 2048}})
        for steps in steps_names:
            prompts = random_prompts(STEPS[steps][0], seed=3)
            tokens = {name: greedy_tokens(path, prompts, steps, dtype="bfloat16", tensor_parallel_size=2,
                                          pipeline_micro_batching=False, **kw)
                      for name, kw in variants.items()}
            result[steps] = {f"{name}_equals_tp2pp1": sum(a == b for a, b in zip(tokens["tp2pp1"], tokens[name]))
                             for name in variants if name != "tp2pp1"}
            print("tp_groups", steps, result[steps], "of 16", flush=True)
    return result


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'1x1,2x1,1x2' -> [(1, 1), (2, 1), (1, 2)] (TP x PP)."""
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


def main() -> None:
    """Correctness first, then each layout's L1 and T1; a table last."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-archs", default="LlamaForCausalLM,MixtralForCausalLM")
    ap.add_argument("--check-steps", default="small,large", help="MoE prefill graphs stop at 128 tokens")
    ap.add_argument("--l1", default="1x1,2x1,1x2", help="TPxPP layouts to time L1 on")
    ap.add_argument("--t1", default="", help="TPxPP layouts to time T1 on")
    ap.add_argument("--l1-config", default="llama-3.1-8b")
    ap.add_argument("--t1-config", default="qwen3-0.6b")
    ap.add_argument("--floor-gb", type=float, default=16.06, help="weight bytes read per token (GB)")
    ap.add_argument("--json", default="bench_pp.json", help="file name of the results under $OUT")
    ap.add_argument("--no-micro-batching", action="store_true",
                    help="L1 / T1 engines with --no-pipeline-micro-batching (one step at a time)")
    ap.add_argument("--no-async-scheduling", action="store_true", help="L1 / T1 engines without async scheduling")
    ap.add_argument("--disable-custom-all-reduce", action="store_true", help="L1 / T1 engines: NCCL all-reduces")
    ap.add_argument("--check-tp-groups", default="",
                    help="4 GPUs: step sizes (small,large) at which TP=2 x PP=2 must give TP=2's bf16 tokens")
    args = ap.parse_args()
    if not args.skip_check:
        record(RESULTS, "pp_tokens", check_tokens, args.check_archs.split(","), args.check_steps.split(","))
    if args.check_tp_groups:
        record(RESULTS, "tp_groups_tokens", check_tp_groups, args.check_tp_groups.split(","))
    bandwidth = record(RESULTS, "copy_bandwidth_gbs", copy_bandwidth_gbs) if args.l1 else 0.0
    engine_kw = {"pipeline_micro_batching": False} if args.no_micro_batching else {}
    if args.no_async_scheduling:
        engine_kw["async_scheduling"] = False
    if args.disable_custom_all_reduce:
        engine_kw["disable_custom_all_reduce"] = True
    for tp, pp in parse_layouts(args.l1):
        # Every layout reads all the weights once per token; only TP splits that read (the floor).
        record(RESULTS, f"l1_tp{tp}pp{pp}", l1, args.l1_config, tp, args.floor_gb, bandwidth, pp=pp, **engine_kw)
    rng = random.Random(1)
    greedy_prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(16, 512))] for _ in range(32)]
    tokens = {}
    for tp, pp in parse_layouts(args.t1):
        res = record(RESULTS, f"t1_tp{tp}pp{pp}", lambda: t1(args.t1_config, tp, greedy_prompts, 128, pp=pp, **engine_kw))
        if isinstance(res, tuple):
            RESULTS[f"t1_tp{tp}pp{pp}"], tokens[tp, pp] = res
    if len(tokens) > 1:
        first, *others = tokens
        for layout in others:
            RESULTS[f"t1_greedy_identical_{first}_vs_{layout}"] = sum(
                a == b for a, b in zip(tokens[first], tokens[layout]))
    print(json.dumps(RESULTS, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, args.json), "w") as f:
            json.dump(RESULTS, f, indent=1)
    print_table(RESULTS)


if __name__ == "__main__":
    main()
