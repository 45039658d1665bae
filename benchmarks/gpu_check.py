"""GPU acceptance run (issue 9): correctness first, then T1 / L1 timings. One command:

    PYTHONPATH=src:. python benchmarks/gpu_check.py [--skip-t1] [--skip-l1]

Needs only torch, triton and transformers. Prints a short table last and writes JSON to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pagedllm import LLM, SamplingParams  # noqa: E402
from tests.models.tiny_models import hf_greedy  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
RESULTS: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def record(results: dict, name: str, fn, *args, **kwargs):
    """results[name] = fn(*args, **kwargs), timed and printed; an exception is printed and recorded
    instead of ending the run (GPU time is scarce)."""
    t0 = time.perf_counter()
    print(f"=== {name}", flush=True)
    try:
        results[name] = fn(*args, **kwargs)
    except Exception as e:  # keep going
        traceback.print_exc()
        results[name] = {"error": repr(e)}
    print(f"--- {name}: {results[name]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return results[name]


def write_results(results: dict, filename: str) -> None:
    """Write `results` as JSON to $OUT/filename when $OUT is set (the device run's output folder)."""
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, filename)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")


def comparisons(result: dict) -> str:
    """A result's `identical_to_<reference>` fields as "reference: k / n; ..." (a table cell)."""
    prefix = "identical_to_"
    return "; ".join(f"{key[len(prefix):]}: {value}" for key, value in result.items() if key.startswith(prefix))


def section(name):
    """Decorator: calling the function records its result in RESULTS under `name` (see `record`)."""
    def wrap(fn):
        def run(*a, **k):
            record(RESULTS, name, fn, *a, **k)
        return run
    return wrap


def _random_hf_model(config_dir_or_arch, path, dtype=torch.float32, std=0.05):
    import transformers

    if os.path.isdir(config_dir_or_arch):
        config = transformers.AutoConfig.from_pretrained(config_dir_or_arch)
    else:
        from tests.models.tiny_models import _COMMON, TINY_CONFIGS

        cls = getattr(transformers, config_dir_or_arch.replace("ForCausalLM", "Config"))
        config = cls(**_COMMON, **TINY_CONFIGS[config_dir_or_arch])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    return model.to("cuda", dtype).eval()


def _prompts(vocab, n=8, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 5000)) for _ in range(L)] for L in (1, 7, 16, 33, 64, 100, 129, 200)[:n]]


def greedy_fp32(model_dir: str, prompts: list[list[int]], max_tokens: int, **llm_kwargs) -> list[list[int]]:
    """fp32 greedy completions of `prompts` by a pagedllm engine built with `llm_kwargs`."""
    llm = LLM(model_dir, skip_tokenizer_init=True, dtype="float32", **llm_kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    del llm
    return [o.outputs[0].token_ids for o in outs]


def greedy_eager_and_graph(model_dir: str, prompts: list[list[int]], max_tokens: int,
                           **llm_kwargs) -> dict[str, list[list[int]]]:
    """fp32 greedy completions of `prompts` by pagedllm with --enforce-eager and with CUDA graphs:
    {"eager": tokens, "graph": tokens}."""
    return {"eager" if eager else "graph": greedy_fp32(model_dir, prompts, max_tokens, enforce_eager=eager,
                                                       max_num_seqs=16, **llm_kwargs)
            for eager in (True, False)}


@section("tiny_fp32_vs_hf")
def tiny_vs_hf():
    res = {}
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        with tempfile.TemporaryDirectory() as d:
            hf = _random_hf_model(arch, d, std=0.08)
            prompts = _prompts(512)
            expected = hf_greedy(hf, prompts, 24)
            tokens = greedy_eager_and_graph(d, prompts, 24, max_model_len=512, gpu_memory_utilization=0.3)
            res.update({f"{arch}_{mode}": toks == expected for mode, toks in tokens.items()})
            del hf
    return res


@section("prefill_graphs_vs_hf")
def prefill_graphs_vs_hf():
    """Chunked prefills mixed with decodes, every step a CUDA graph: small steps (<= 48 tokens,
    the graphs of 16-48 tokens) and large ones (long prompts in steps of up to 2048 tokens, the
    graphs of 384-2048 tokens; MoE models run those eagerly). fp32 greedy == HF for a dense, a
    tied-embedding, an MoE and two sliding-window families, and == the same engine with prefill
    steps run eagerly."""
    from tests.models.test_phi3_mixtral import CONFIGS as MOE_CONFIGS
    from tests.models.tiny_models import SLIDING_WINDOW_CONFIGS, TINY_CONFIGS, build_tiny_model, random_prompts

    res = {}
    cases = [("LlamaForCausalLM", TINY_CONFIGS), ("Qwen3ForCausalLM", TINY_CONFIGS),
             ("MixtralForCausalLM", MOE_CONFIGS), ("Phi3ForCausalLM", MOE_CONFIGS), ("Gemma2ForCausalLM", SLIDING_WINDOW_CONFIGS),
             ("MistralForCausalLM", SLIDING_WINDOW_CONFIGS)]
    steps = {  # name: (prompt lengths, step token budget, max_model_len)
        "small": ([5, 17, 30, 64, 100, 3, 45, 81], 48, 256),
        "large": ([300, 700, 1100, 1500, 90, 900, 1999, 450], 2048, 2048),
    }
    for arch, configs in cases:
        # Positions up to 2048 for the large steps (the tiny shape stops at 512).
        configs = {arch: {**configs[arch], "max_position_embeddings": 2048}}
        with tempfile.TemporaryDirectory() as d:
            hf = build_tiny_model(arch, d, configs=configs).to("cuda")
            expected = {name: hf_greedy(hf, random_prompts(lengths), 24) for name, (lengths, _, _) in steps.items()}
            del hf
            for name, (lengths, budget, max_len) in steps.items():
                tokens = {kind: greedy_fp32(d, random_prompts(lengths), 24, max_num_seqs=8,
                                            max_num_batched_tokens=budget, max_model_len=max_len,
                                            gpu_memory_utilization=0.3, cuda_graph_max_prefill_tokens=max_prefill)
                          for kind, max_prefill in (("graphs", budget), ("prefill_eager", 0))}
                res[f"{arch}_{name}_graphs_equal_hf"] = tokens["graphs"] == expected[name]
                res[f"{arch}_{name}_prefill_eager_equal_hf"] = tokens["prefill_eager"] == expected[name]
                res[f"{arch}_{name}_graphs_equal_prefill_eager"] = tokens["graphs"] == tokens["prefill_eager"]
    return res


@section("smollm2_shape")
def smollm2_shape():
    res = {}
    with tempfile.TemporaryDirectory() as d:
        hf = _random_hf_model(os.path.join(CONFIGS, "smollm2-135m"), d, std=0.05)
        prompts = _prompts(49152)
        expected = hf_greedy(hf, prompts, 32)
        tokens = greedy_eager_and_graph(d, prompts, 32, max_model_len=1024, gpu_memory_utilization=0.3)
        res.update({f"fp32_{mode}_equals_hf": toks == expected for mode, toks in tokens.items()})
        res["graph_equals_eager"] = tokens["eager"] == tokens["graph"]
        # bf16: logprobs of the greedy tokens close to HF bf16's.
        hf = hf.to(torch.bfloat16)
        llm = LLM(d, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
        p = prompts[5]
        out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=8, logprobs=1,
                                                                     ignore_eos=True), use_tqdm=False)[0].outputs[0]
        seq = torch.tensor([p + out.token_ids], device="cuda")
        with torch.no_grad():
            logits = hf(seq).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        hf_lp = [logits[i, t].item() for i, t in enumerate(out.token_ids)]
        ours = [out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)]
        res["bf16_max_abs_logprob_diff"] = max(abs(a - b) for a, b in zip(hf_lp, ours))
        del llm, hf
    return res


@section("t1")
def t1(hf_requests: int):
    from pagedllm.benchmarks.throughput import bench_pagedllm, t1_requests

    reqs = t1_requests()
    t0 = time.perf_counter()
    llm = LLM(os.path.join(CONFIGS, "qwen3-0.6b"), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384)
    startup = time.perf_counter() - t0
    res = {"startup_s": startup, "num_blocks": llm.llm_engine.config.cache_config.num_blocks}
    runs = [bench_pagedllm(llm, reqs, 0.6) for _ in range(2)]
    res["runs_output_tok_s"] = [r["output_tok_s"] for r in runs]
    res.update({k: runs[-1][k] for k in ("seconds", "output_tokens", "output_tok_s")})
    del llm
    torch.cuda.empty_cache()
    return res


def measure_l1(**engine_kwargs) -> tuple[dict, object]:
    """L1 on Llama-3.1-8B dims: startup, best TTFT and median-of-3 TPOT after a warm-up run.
    Returns (result, engine) so callers can look further."""
    from pagedllm.benchmarks.latency import measure_latency
    from pagedllm.config import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    eng = LLMEngine.from_engine_args(EngineArgs(model=os.path.join(CONFIGS, "llama-3.1-8b"), load_format="dummy",
                                                skip_tokenizer_init=True, max_model_len=4096, max_num_seqs=8,
                                                **engine_kwargs))
    startup = time.perf_counter() - t0
    rng = random.Random(0)
    prompt = [[rng.randrange(100, 10000) for _ in range(128)]]
    measure_latency(eng, prompt, 8)
    runs = [measure_latency(eng, prompt, 256) for _ in range(3)]
    return {"startup_s": startup, "ttft_ms": min(r["ttft_s"] for r in runs) * 1e3,
            "tpot_ms": sorted(r["tpot_median_s"] for r in runs)[1] * 1e3,
            "tpot_mean_ms": sorted(r["tpot_mean_s"] for r in runs)[1] * 1e3}, eng


@section("l1")
def l1():
    res = {}
    for eager in (False, True):
        res["eager" if eager else "graph"], eng = measure_l1(enforce_eager=eager)
        del eng
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-t1", action="store_true")
    ap.add_argument("--skip-l1", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--hf-requests", type=int, default=0)
    ap.add_argument("--only-prefill-graphs", action="store_true", help="only the prefill-graph correctness check")
    args = ap.parse_args()
    if args.only_prefill_graphs:
        prefill_graphs_vs_hf()
        print(json.dumps(RESULTS, indent=1))
        write_results(RESULTS, "gpu_check_prefill_graphs.json")
        return
    if not args.skip_correctness:
        prefill_graphs_vs_hf()
        tiny_vs_hf()
        smollm2_shape()
    if not args.skip_l1:
        l1()
    if not args.skip_t1:
        t1(args.hf_requests)
    print(json.dumps(RESULTS, indent=1))
    write_results(RESULTS, "gpu_check.json")


if __name__ == "__main__":
    main()
