"""GPU checks for sliding windows and tensor parallelism (issues 5 and 6), fp32 so greedy ids are exact:

    PYTHONPATH=src:. python benchmarks/gpu_check_window_tp.py [--skip-tp]

1. Tiny Gemma 2, Gemma 3 and an all-sliding Mistral (window 12, prompts up to 47 tokens):
   greedy ids of the Triton path (eager and CUDA graphs) equal HF `generate` on the GPU.
2. Qwen3-0.6B dimensions, dummy weights, fp32: greedy ids at TP=2 equal TP=1 (in separate
   processes, so that the TP=1 engine's memory is gone before TP=2 sizes its pool).
Prints JSON and writes it to $OUT/gpu_check_window_tp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pagedllm import LLM, SamplingParams  # noqa: E402
from benchmarks.gpu_check import greedy_eager_and_graph  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def sliding_window_vs_hf() -> dict:
    from tests.models.tiny_models import SLIDING_WINDOW_CONFIGS, build_tiny_model, hf_greedy, random_prompts

    prompts = random_prompts([1, 3, 8, 12, 13, 17, 31, 47], seed=1)
    res = {}
    for arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "MistralForCausalLM"):
        with tempfile.TemporaryDirectory() as d:
            hf = build_tiny_model(arch, d, configs=SLIDING_WINDOW_CONFIGS, perturb_norms=True).to("cuda")
            expected = hf_greedy(hf, prompts, 16)
            tokens = greedy_eager_and_graph(d, prompts, 16, max_model_len=256, num_gpu_blocks_override=64)
            res.update({f"{arch}_{mode}": toks == expected for mode, toks in tokens.items()})
    return res


def tp_tokens(tp: int, path: str) -> None:
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(16, 300))] for _ in range(16)]
    llm = LLM(os.path.join(CONFIGS, "qwen3-0.6b"), load_format="dummy", skip_tokenizer_init=True, dtype="float32",
              tensor_parallel_size=tp, max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    with open(path, "w") as f:
        json.dump([o.outputs[0].token_ids for o in outs], f)
    llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--tp-child", type=int, default=None)
    ap.add_argument("--tokens-path", default=None)
    args = ap.parse_args()
    if args.tp_child is not None:
        tp_tokens(args.tp_child, args.tokens_path)
        return
    results = {"device": torch.cuda.get_device_name(0), "sliding_window_fp32_equals_hf": sliding_window_vs_hf()}
    print(json.dumps(results), flush=True)
    if not args.skip_tp and torch.cuda.device_count() >= 2:
        tokens = {}
        with tempfile.TemporaryDirectory() as d:
            for tp in (1, 2):
                path = os.path.join(d, f"tp{tp}.json")
                subprocess.run([sys.executable, __file__, "--tp-child", str(tp), "--tokens-path", path], check=True)
                tokens[tp] = json.load(open(path))
        same = [a == b for a, b in zip(tokens[1], tokens[2])]
        results["tp2_equals_tp1_fp32"] = {"identical": sum(same), "of": len(same)}
    print(json.dumps(results, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check_window_tp.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
