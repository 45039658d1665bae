"""TP=2 greedy tokens == TP=1 on the GPU (tiny random Llama, fp32 and bf16), custom all-reduce on;
and TP=2 with the custom all-reduce == TP=2 with NCCL only (bf16 is where the custom one runs).

    PYTHONPATH=src:. python benchmarks/check_tp_tokens_gpu.py
"""

from __future__ import annotations

import json
import sys
import tempfile

from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import build_tiny_model, random_prompts


def main() -> None:
    """Print, per dtype, how many of 16 prompts' greedy tokens TP=2 shares with TP=1, and the
    custom all-reduce with NCCL."""
    prompts = random_prompts([1, 5, 16, 17, 33, 60, 100, 150] * 2, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    result = {}
    with tempfile.TemporaryDirectory() as path:
        build_tiny_model("LlamaForCausalLM", path)
        for dtype in ("float32", "bfloat16"):
            tokens = {}
            # (TP size, NCCL only): the custom all-reduce (bf16) must give NCCL's tokens exactly.
            for tp, nccl_only in ((1, False), (2, False), (2, True)):
                with LLM(path, skip_tokenizer_init=True, dtype=dtype, tensor_parallel_size=tp,
                         kv_cache_memory_bytes=1 << 30, max_model_len=512,
                         # Chunks of <= 64 tokens mixed with decodes: those steps replay prefill graphs.
                         max_num_batched_tokens=64,
                         disable_custom_all_reduce=nccl_only) as llm:
                    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                    tokens[tp, nccl_only] = [o.outputs[0].token_ids for o in outs]
            result[dtype] = {
                "tp2_equals_tp1": sum(a == b for a, b in zip(tokens[1, False], tokens[2, False])),
                "tp2_custom_equals_tp2_nccl": sum(a == b for a, b in zip(tokens[2, False], tokens[2, True])),
            }
    print("of 16 prompts:", json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
