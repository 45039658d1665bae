"""Greedy tokens on the GPU when decodes share steps with prefill chunks (the folded decode path).

    PYTHONPATH=src:. python benchmarks/check_mixed_fold_gpu.py

A tiny random Llama and Qwen3 in fp32; 12 prompts of 3..300 tokens with a 64-token step budget,
so most steps mix decodes (rotary and K/V write folded into the decode kernel) with prefill
chunks (separate kernels from an offset). Tokens must equal Hugging Face greedy, with fused
kernels on (eager and CUDA graphs) and off. Prints one JSON line.
"""

from __future__ import annotations

import json
import random
import tempfile

from gpu_check import _random_hf_model
from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import hf_greedy


def main() -> None:
    """Compare each engine variant's greedy tokens to HF's, per architecture."""
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 500) for _ in range(n)] for n in (3, 300, 17, 120, 64, 5, 250, 33, 1, 90, 200, 16)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    result = {}
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        with tempfile.TemporaryDirectory() as d:
            hf = _random_hf_model(arch, d, std=0.08)
            expected = hf_greedy(hf, prompts, 20)
            del hf
            for name, kwargs in (("eager", dict(enforce_eager=True)), ("graph", {}),
                                 ("unfused", dict(fused_kernels=False, enforce_eager=True))):
                llm = LLM(d, skip_tokenizer_init=True, dtype="float32", max_model_len=512, max_num_seqs=16,
                          max_num_batched_tokens=64, gpu_memory_utilization=0.2, **kwargs)
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                result[f"{arch}_{name}_equals_hf"] = sum(
                    o.outputs[0].token_ids == e for o, e in zip(outs, expected))
                del llm
    print("mixed_fold (of 12):", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
