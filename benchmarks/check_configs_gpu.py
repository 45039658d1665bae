"""Start-up and greedy tokens across unusual but valid engine configurations, one GPU.

    PYTHONPATH=src:. python3 benchmarks/check_configs_gpu.py [--only NAME,NAME]

The twenty-fourth session found two start-up crashes (illegal addresses) that only a small
`max_num_seqs` with a short `max_model_len` reached: the defaults had hidden them. This script
starts a small random Llama (fp32, so every configuration must give the same greedy tokens) under
each configuration of CONFIGS, each in its own process (an illegal address poisons its CUDA
context), and compares its tokens with the eager engine's (`enforce_eager`, the plain path);
a few bf16 configurations (the CUDA decode attention, the CUDA GEMV forced) must start and run,
their tokens compared with bf16's default engine for information.
Mixed prompt lengths, a shared prefix (prefix caching), more prompts than `max_num_seqs`
(queueing) and a few that reach `max_model_len`. Prints a table last; writes
$OUT/check_configs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

MAX_NEW_TOKENS = 24
ENV = "env"  # a configuration's environment variables (set in its process only)
# name: engine arguments on top of (dtype fp32, max_model_len 160, the script's prompts)
CONFIGS: dict[str, dict[str, Any]] = {
    "eager": {"enforce_eager": True},  # the reference
    "default": {},
    "seqs1": {"max_num_seqs": 1},
    "seqs2": {"max_num_seqs": 2},
    "seqs3": {"max_num_seqs": 3},
    "seqs5_budget64": {"max_num_seqs": 5, "max_num_batched_tokens": 64},
    "block8": {"block_size": 8},
    "block32": {"block_size": 32},
    "block32_seqs1": {"block_size": 32, "max_num_seqs": 1},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "no_async": {"async_scheduling": False},
    "no_prefill_graphs": {"cuda_graph_max_prefill_tokens": 0},
    "prefill_graphs_100": {"cuda_graph_max_prefill_tokens": 100},
    "tight_pool": {"num_gpu_blocks_override": 24},  # preemption
    "max_len_512_seqs1": {"max_model_len": 512, "max_num_seqs": 1},
    # bf16 (the CUDA decode attention and, forced, the CUDA GEMV at one token): must start and
    # run; tokens against bf16_default for information (bf16 kernels round by batch size).
    "bf16_default": {"dtype": "bfloat16"},
    "bf16_seqs1_gemv": {"dtype": "bfloat16", "max_num_seqs": 1, ENV: {"PAGEDLLM_PREFER_CUDA_GEMV": "1"}},
    "bf16_seqs3_block32_gemv": {"dtype": "bfloat16", "max_num_seqs": 3, "block_size": 32,
                                ENV: {"PAGEDLLM_PREFER_CUDA_GEMV": "1"}},
    "bf16_seqs2_no_prefix_caching": {"dtype": "bfloat16", "max_num_seqs": 2, "enable_prefix_caching": False},
}


def prompts() -> list[list[int]]:
    """Mixed lengths, two sharing a 48-token prefix, two that fill max_model_len (160) with the
    new tokens."""
    from tests.models.tiny_models import random_prompts

    mixed = random_prompts([1, 5, 16, 17, 40, 64, 100, 9], seed=11)
    shared = random_prompts([48], seed=12)[0]
    return mixed + [shared + p for p in random_prompts([10, 30], seed=13)] + random_prompts([136, 130], seed=14)


def child(name: str, path: str) -> None:
    """Run one configuration and print its tokens as one JSON line."""
    from pagedllm import LLM, SamplingParams

    kw = {"dtype": "float32", "max_model_len": 160, "kv_cache_memory_bytes": 1 << 28, **CONFIGS[name]}
    kw.pop(ENV, None)
    if "num_gpu_blocks_override" in kw:
        kw.pop("kv_cache_memory_bytes")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    with LLM(path, skip_tokenizer_init=True, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)


def main() -> None:
    """Every configuration in its own process; each compared with the eager reference."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated names (the reference always runs)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per configuration")
    args = ap.parse_args()
    names = list(CONFIGS)
    if args.only:  # the references run first
        names = ["eager", "bf16_default"] + [n for n in args.only.split(",") if n not in ("eager", "bf16_default")]
    from gpu_check import comparisons, write_results
    from tests.models.tiny_models import build_tiny_model

    result: dict[str, Any] = {}
    tokens: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as path:
        build_tiny_model("LlamaForCausalLM", path)
        for name in names:
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", name, path], capture_output=True,
                                      text=True, timeout=args.timeout, cwd=ROOT,
                                      env={**os.environ, **CONFIGS[name].get(ENV, {})})
                lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
                if lines:
                    tokens[name] = json.loads(lines[-1][len("TOKENS "):])
                    result[name] = {"ok": True}
                else:
                    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
                    result[name] = {"ok": False, "rc": proc.returncode, "error": " | ".join(errors[-3:])[:400]}
            except subprocess.TimeoutExpired:
                result[name] = {"ok": False, "error": f"no answer in {args.timeout:.0f} s"}
            result[name]["seconds"] = round(time.perf_counter() - t0, 1)
            reference = "bf16_default" if CONFIGS[name].get("dtype") == "bfloat16" else "eager"
            if name != reference and name in tokens and reference in tokens:
                same = sum(a == b for a, b in zip(tokens[name], tokens[reference]))
                result[name][f"identical_to_{reference}"] = f"{same} / {len(tokens[reference])}"
            print(name, result[name], flush=True)
    print("\n| config | engine arguments | started and ran | greedy tokens == reference |\n| --- | --- | --- | --- |")
    for name, res in result.items():
        ran = "yes" if res["ok"] else "NO: " + res.get("error", "")
        print(f"| {name} | {CONFIGS[name]} | {ran} | {comparisons(res) or '-'} |")
    write_results(result, "check_configs.json")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
