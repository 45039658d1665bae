"""TP=2 greedy tokens == TP=1 on the GPU (tiny random Llama, fp32 and bf16), custom all-reduce on;
and TP=2 with the custom all-reduce == TP=2 with NCCL only (bf16 is where the custom one runs).

    PYTHONPATH=src:. python benchmarks/check_tp_tokens_gpu.py [--steps small,large]

Small steps: prompts of 1-150 tokens in steps of <= 64 tokens (the prefill graphs of 16-64
tokens). Large steps: prompts of 90-1999 tokens in steps of <= 2048 tokens (the graphs of
384-2048 tokens; in fp32 every all-reduce, captured, goes through NCCL).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import TINY_CONFIGS, build_tiny_model, random_prompts


STEPS = {  # name: (prompt lengths, step token budget, max_model_len)
    "small": ([1, 5, 16, 17, 33, 60, 100, 150] * 2, 64, 512),
    "large": ([300, 700, 1100, 1500, 90, 900, 1999, 450] * 2, 2048, 2048),
}


def main() -> None:
    """Print, per step size and dtype, how many of 16 prompts' greedy tokens TP=2 shares with
    TP=1, and the custom all-reduce with NCCL."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="small,large")
    args = ap.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    result = {}
    with tempfile.TemporaryDirectory() as path:
        # Positions up to 2048 for the large steps (the tiny shape stops at 512).
        build_tiny_model("LlamaForCausalLM", path,
                         configs={"LlamaForCausalLM": {**TINY_CONFIGS["LlamaForCausalLM"], "max_position_embeddings": 2048}})
        for steps in args.steps.split(","):
            lengths, budget, max_len = STEPS[steps]
            prompts = random_prompts(lengths, seed=3)
            for dtype in ("float32", "bfloat16"):
                tokens = {}
                # (TP size, NCCL only): the custom all-reduce (bf16) must give NCCL's tokens exactly.
                for tp, nccl_only in ((1, False), (2, False), (2, True)):
                    with LLM(path, skip_tokenizer_init=True, dtype=dtype, tensor_parallel_size=tp,
                             kv_cache_memory_bytes=1 << 30, max_model_len=max_len,
                             # Chunks mixed with decodes: those steps replay prefill graphs.
                             max_num_batched_tokens=budget, cuda_graph_max_prefill_tokens=budget,
                             disable_custom_all_reduce=nccl_only) as llm:
                        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                        tokens[tp, nccl_only] = [o.outputs[0].token_ids for o in outs]
                result[f"{steps}_{dtype}"] = {
                    "tp2_equals_tp1": sum(a == b for a, b in zip(tokens[1, False], tokens[2, False])),
                    "tp2_custom_equals_tp2_nccl": sum(a == b for a, b in zip(tokens[2, False], tokens[2, True])),
                }
                print(steps, dtype, result[f"{steps}_{dtype}"], flush=True)
    print("of 16 prompts:", json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
