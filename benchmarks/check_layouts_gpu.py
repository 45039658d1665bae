"""Greedy tokens of every parallel layout that fits the machine (TP=1, 2, 4; PP=2; TP=2 x PP=2), with
the CUDA GEMV kernel forced on a small random Llama so that batch-1 decodes take it, and the
all-reduce sites' exchange (TP=2) on and off.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=src:. \\
        python3 benchmarks/check_layouts_gpu.py

What must hold (printed per layout as "identical to <reference>: k / n"):
- fp32: every layout gives TP=1's tokens (fp32 runs no custom kernel of its own here);
- bf16: the exchange gives the plain one-shot all-reduce's tokens (TP=2, and each TP=2 stage
  of PP=2), the one-shot all-reduce gives NCCL's (TP=4), and PP=2 gives TP=1's (the same
  kernels per layer): each sums in the same order, bit for bit. bf16 across TP sizes parts at
  near-ties and is printed for information. Layouts needing more GPUs than the machine has are
  skipped (on CPU every layout runs, over gloo).
Every decode is batch 1 (max_num_seqs=1), the shape the CUDA GEMV and its exchange serve.
Writes $OUT/check_layouts.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.worker import worker as worker_module  # noqa: E402
from tests.models.tiny_models import TINY_CONFIGS, build_tiny_model, random_prompts  # noqa: E402

# name: (dtype, tp, pp, extra environment, engine arguments, reference layout or None)
LAYOUTS: list[tuple[str, str, int, int, dict[str, str], dict[str, Any], str | None]] = [
    ("fp32_tp1", "float32", 1, 1, {}, {}, None),
    ("fp32_tp2", "float32", 2, 1, {}, {}, "fp32_tp1"),
    ("fp32_tp4", "float32", 4, 1, {}, {}, "fp32_tp1"),
    ("fp32_pp2", "float32", 1, 2, {}, {}, "fp32_tp1"),
    ("fp32_tp2pp2", "float32", 2, 2, {}, {}, "fp32_tp1"),
    ("bf16_tp2_plain", "bfloat16", 2, 1, {"PAGEDLLM_GEMV_ALL_REDUCE": "0"}, {}, None),
    ("bf16_tp2", "bfloat16", 2, 1, {}, {}, "bf16_tp2_plain"),
    ("bf16_tp2pp2", "bfloat16", 2, 2, {}, {}, "bf16_tp2"),
    ("bf16_tp4_nccl", "bfloat16", 4, 1, {}, {"disable_custom_all_reduce": True}, None),
    ("bf16_tp4", "bfloat16", 4, 1, {}, {}, "bf16_tp4_nccl"),
    ("bf16_tp1", "bfloat16", 1, 1, {}, {}, None),
    ("bf16_pp2", "bfloat16", 1, 2, {}, {}, "bf16_tp1"),
]
INFORMATIVE = {"bf16_tp2": "bf16_tp1", "bf16_tp4": "bf16_tp1"}  # near-ties may part these


def _layout_info(self: Any) -> dict[str, Any]:
    """Worker method: this rank's all-reduce path and how many layers exchange on the GEMVs."""
    from pagedllm.distributed import get_custom_all_reduce

    model = self.model_runner.model
    return {"custom_all_reduce": get_custom_all_reduce() is not None,
            "gemv_exchange_layers": sum(getattr(m, "exchange", None) is not None for m in model.modules())}


# Spawned workers import this file as __mp_main__, so they carry the method too.
worker_module.Worker.layout_info = _layout_info  # type: ignore[attr-defined]


def main() -> None:
    """Run every layout, compare each with its reference, print a table, write JSON."""
    # Here, not at module level: the spawned workers import this file, and gpu_check touches GPU 0.
    from gpu_check import comparisons, write_results

    os.environ["PAGEDLLM_PREFER_CUDA_GEMV"] = "1"  # the small model's GEMVs take the CUDA kernel
    shape = {**TINY_CONFIGS["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1536,
             "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 4}
    # Prompts longer than 16 tokens: a prefill of <= 16 rows would take the skinny GEMM, whose
    # config is tuned by timing in each process, so two layouts could differ by the tuner alone.
    prompts = random_prompts([23, 17, 40, 64, 100, 19, 130, 33], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens: dict[str, list[list[int]]] = {}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as path:
        build_tiny_model("LlamaForCausalLM", path, configs={"LlamaForCausalLM": shape})
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
        for name, dtype, tp, pp, env, engine_kw, _ in LAYOUTS:
            if gpus is not None and tp * pp > gpus:
                continue
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            t0 = time.perf_counter()
            try:
                with LLM(path, skip_tokenizer_init=True, dtype=dtype, tensor_parallel_size=tp,
                         pipeline_parallel_size=pp, max_num_seqs=1, kv_cache_memory_bytes=1 << 28,
                         max_model_len=512, **engine_kw) as llm:
                    info = llm.llm_engine.engine_core.executor.collective_rpc("layout_info")
                    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                    tokens[name] = [o.outputs[0].token_ids for o in outs]
                result[name] = {"ranks": info, "seconds": round(time.perf_counter() - t0, 1)}
            except Exception as exc:  # one layout's failure is a result, not the end of the check
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            print(name, result[name], flush=True)
    for name, *_, reference in LAYOUTS:
        pairs = [(reference, True)] + ([(INFORMATIVE[name], False)] if name in INFORMATIVE else [])
        for ref, required in pairs:
            if ref and name in tokens and ref in tokens:
                same = sum(a == b for a, b in zip(tokens[name], tokens[ref]))
                result[name][f"identical_to_{ref}"] = f"{same} / {len(prompts)}"
                if required and same != len(prompts):
                    result[name]["MISMATCH"] = True
    print("\n| layout | ranks: exchange layers | compared | error or mismatch |\n| --- | --- | --- | --- |")
    for name, res in result.items():
        layers = [r["gemv_exchange_layers"] for r in res.get("ranks", [])]
        flag = res.get("error", "MISMATCH" if res.get("MISMATCH") else "")
        print(f"| {name} | {layers} | {comparisons(res)} | {flag} |")
    write_results(result, "check_layouts.json")


if __name__ == "__main__":
    main()
