"""TP=2 greedy tokens == TP=1 on the GPU (tiny random Llama, fp32 and bf16), custom all-reduce on.

    PYTHONPATH=src:. python benchmarks/check_tp_tokens_gpu.py
"""

from __future__ import annotations

import json
import sys
import tempfile

from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import build_tiny_model, random_prompts


def main() -> None:
    """Print, per dtype, whether TP=2 gives TP=1's greedy tokens for 16 prompts."""
    prompts = random_prompts([1, 5, 16, 17, 33, 60, 100, 150] * 2, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    result = {}
    with tempfile.TemporaryDirectory() as path:
        build_tiny_model("LlamaForCausalLM", path)
        for dtype in ("float32", "bfloat16"):
            tokens = {}
            for tp in (1, 2):
                with LLM(path, skip_tokenizer_init=True, dtype=dtype, tensor_parallel_size=tp,
                         kv_cache_memory_bytes=1 << 30, max_model_len=512) as llm:
                    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                    tokens[tp] = [o.outputs[0].token_ids for o in outs]
            result[dtype] = sum(a == b for a, b in zip(tokens[1], tokens[2]))
    print("tp2_equals_tp1 (of 16):", json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
