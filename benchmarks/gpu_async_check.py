"""GPU run for async scheduling and the fused sampling kernel (issue 9): correctness, then L1 / T1.

    PYTHONPATH=src:. python benchmarks/gpu_async_check.py            # everything, one process per variant
    PYTHONPATH=src:. python benchmarks/gpu_async_check.py --only t1 --async-scheduling 1 --triton-sampling 1

Correctness: greedy tokens of a tiny fp32 model with async scheduling == synchronous == HF on the
GPU; seeded samples async == sync; the Triton sampling kernel equals its PyTorch reference on the
same uniforms and matches softmax(logits / T) in distribution. Then L1 (Llama-3.1-8B dims) and T1
(Qwen3-0.6B dims, temperature 0.6) for sync / async scheduling and torch / Triton sampling, each
variant in a fresh process (an engine sizes its KV pool from the memory left free). Prints a table
last and writes JSON to $OUT.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu_check import CONFIGS, _prompts, _random_hf_model, measure_l1, record, write_results  # noqa: E402
from pagedllm import LLM, SamplingParams  # noqa: E402
from tests.models.tiny_models import hf_greedy  # noqa: E402


def correctness() -> dict:
    """Async == sync == HF (greedy, fp32), seeded async == sync, Triton sampler vs reference."""
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        hf = _random_hf_model("LlamaForCausalLM", d, std=0.08)
        prompts = _prompts(512)
        expected = hf_greedy(hf, prompts, 24)
        del hf
        seeded = [SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True) for i in range(len(prompts))]
        outs = {}
        for async_scheduling in (False, True):
            llm = LLM(d, skip_tokenizer_init=True, dtype="float32", max_model_len=512, gpu_memory_utilization=0.2,
                      max_num_seqs=16, async_scheduling=async_scheduling)
            greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                  SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
            sampled = llm.generate([{"prompt_token_ids": p} for p in prompts], seeded, use_tqdm=False)
            outs[async_scheduling] = ([o.outputs[0].token_ids for o in greedy], [o.outputs[0].token_ids for o in sampled])
            res[f"pipelined_steps_async_{async_scheduling}"] = llm.llm_engine.engine_core.num_pipelined_steps
            del llm
            torch.cuda.empty_cache()
        res["sync_greedy_equals_hf"] = outs[False][0] == expected
        res["async_greedy_equals_hf"] = outs[True][0] == expected
        res["async_seeded_equals_sync"] = outs[True][1] == outs[False][1]
    from pagedllm.worker.triton_sampling import gumbel_max_sample, philox_uniforms

    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(256, 151936, device="cuda", generator=gen) * 4).to(dtype)
        temperature = torch.rand(256, device="cuda", generator=gen) + 0.2
        ids = gumbel_max_sample(logits, temperature, seed=1234)
        u = philox_uniforms(1234, 256, 151936, torch.device("cuda"))
        ref = (logits.float() / temperature[:, None] - torch.log(-torch.log(u))).argmax(-1)
        res[f"triton_sampler_equals_reference_{dtype}"] = f"{int((ids == ref).sum())}/256"
    # Distribution: 8 tokens, 65,536 identical rows.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.5, -0.5], device="cuda").repeat(65536, 1)
    temperature = torch.full((65536,), 0.6, device="cuda")
    counts = torch.bincount(gumbel_max_sample(logits, temperature, seed=7), minlength=8).float()
    probs = torch.softmax(logits[0] / 0.6, -1)
    sigma = (65536 * probs * (1 - probs)).sqrt()
    res["triton_sampler_max_sigma"] = float(((counts - 65536 * probs).abs() / sigma).max())
    return res


def t1_variant(async_scheduling: bool, triton_sampling: bool, skinny_gemm: bool = True) -> dict:
    """T1 (two passes: the first compiles what the warm-up did not reach) in this process."""
    import pagedllm.layers.linear
    from pagedllm.benchmarks.throughput import bench_pagedllm, t1_requests

    if not skinny_gemm:
        pagedllm.layers.linear.SKINNY_MAX_TOKENS = 0

    reqs = t1_requests()
    t0 = time.perf_counter()
    llm = LLM(os.path.join(CONFIGS, "qwen3-0.6b"), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384, async_scheduling=async_scheduling)
    startup = time.perf_counter() - t0
    llm.llm_engine.engine_core.executor.worker.model_runner.sampler.use_triton = triton_sampling
    gc_pauses = GcPauses()
    compiles = _log_triton_compiles()
    # PROFILE_STEPS=n: torch-profile each pass's first n steps (its prefill) and list the host ops.
    profile_steps = int(os.environ.get("PROFILE_STEPS", "0"))
    os.environ.setdefault("PAGEDLLM_TORCH_PROFILER_DIR", os.path.join(os.environ.get("OUT", "/tmp"), "traces"))
    trace = StepTrace(llm.llm_engine.engine_core.scheduler, llm if profile_steps else None, profile_steps)
    runs, step_profiles, compiled, pauses, host_profiles = [], [], [], [], []
    for _ in range(2):
        trace.clear()
        gc_pauses.clear()
        if profile_steps:
            llm.start_profile()
        runs.append(bench_pagedllm(llm, reqs, 0.6))
        step_profiles.append(trace.summary())
        pauses.append(gc_pauses.summary())
        if trace.trace_paths:
            from benchmarks.trace_summary import host_ops

            host_profiles.append(host_ops(trace.trace_paths[-1][0]))
        compiled.append(dict(compiles))
        compiles.clear()
        # The next pass must compute its prompts again (the protocol's pass has no cache hits).
        assert llm.reset_prefix_cache()
    greedy = bench_pagedllm(llm, reqs, 0.0)
    return {"startup_s": startup, "passes_tok_s": [r["output_tok_s"] for r in runs],
            "output_tokens": runs[-1]["output_tokens"], "greedy_tok_s": greedy["output_tok_s"],
            "pipelined_steps": llm.llm_engine.engine_core.num_pipelined_steps,
            "triton_compiles_per_pass": compiled, "step_profile_per_pass": step_profiles,
            "gc_pauses_per_pass": pauses, "host_ops_first_steps_per_pass": host_profiles}


class GcPauses:
    """Counts and total seconds of the garbage collector's pauses, by generation."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {}
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.setdefault(info["generation"], []).append(time.perf_counter() - self._start)

    def clear(self) -> None:
        """Forget the pauses so far."""
        self.pauses.clear()

    def summary(self) -> dict:
        """{generation: {count, seconds, max_ms}}."""
        return {f"gen{g}": {"count": len(v), "seconds": round(sum(v), 4), "max_ms": round(max(v) * 1e3, 2)}
                for g, v in sorted(self.pauses.items())}


class StepTrace:
    """Records when each step is scheduled and its shape; the gaps between schedules are the step
    times (with async scheduling the device sets the pace once it is the bound)."""

    BUCKETS = ((1, 16), (17, 32), (33, 64), (65, 128), (129, 192), (193, 256), (257, 10**9))

    def __init__(self, scheduler, profiled_llm=None, profile_steps: int = 0) -> None:
        self.steps: list[tuple[float, int, int]] = []
        self.trace_paths: list[list[str]] = []
        schedule = scheduler.schedule

        def traced():
            out = schedule()
            self.steps.append((time.perf_counter(), len(out.num_scheduled_tokens), out.total_num_scheduled_tokens))
            if profiled_llm is not None and len(self.steps) == profile_steps:
                self.trace_paths.append(profiled_llm.stop_profile())
            return out

        scheduler.schedule = traced

    def clear(self) -> None:
        """Forget the steps recorded so far."""
        self.steps.clear()

    def summary(self) -> dict:
        """Seconds and step counts by kind: steps with prompt tokens, and decode steps by batch size."""
        rows: dict[str, list[float]] = {}
        for (t, reqs, tokens), (t_next, _, _) in zip(self.steps, self.steps[1:]):
            if reqs == 0:
                key = "empty"
            elif tokens > reqs:
                key = "prefill"
            else:
                lo, hi = next(b for b in self.BUCKETS if b[0] <= reqs <= b[1])
                key = f"decode_{lo}-{hi}"
            rows.setdefault(key, []).append(t_next - t)
        summary = {key: {"steps": len(v), "seconds": round(sum(v), 4), "mean_ms": round(sum(v) / len(v) * 1e3, 3)}
                   for key, v in sorted(rows.items())}
        # The steps with prompt tokens one by one: (ms, requests, tokens).
        summary["prefill_steps"] = [(round((t_next - t) * 1e3, 2), reqs, tokens)
                                    for (t, reqs, tokens), (t_next, _, _) in zip(self.steps, self.steps[1:])
                                    if tokens > reqs]
        return summary


def _log_triton_compiles() -> dict:
    """Count Triton JIT compilations (in-memory cache misses) by kernel and specialisation."""
    import triton.runtime.jit as jit

    counts: dict = {}
    original = jit.JITFunction._do_compile

    def logged(self, key, signature, device, constexprs, options, attrs, warmup):
        name = f"{self.fn.__name__} {str(key)[:300]}"
        counts[name] = counts.get(name, 0) + 1
        return original(self, key, signature, device, constexprs, options, attrs, warmup)

    jit.JITFunction._do_compile = logged
    return counts


def l1_variant(async_scheduling: bool, skinny_gemm: bool = True) -> dict:
    """L1 TPOT / TTFT (median of 3 runs after a warm-up) in this process."""
    import pagedllm.layers.linear

    if not skinny_gemm:
        pagedllm.layers.linear.SKINNY_MAX_TOKENS = 0  # every linear through cuBLAS
    result, eng = measure_l1(async_scheduling=async_scheduling)
    # Where the TTFT goes: the first engine steps of one more request, one by one.
    prompt = [random.Random(0).randrange(100, 10000) for _ in range(128)]
    eng.add_request("first-steps", {"prompt_token_ids": prompt},
                    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    first_steps = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        got = eng.step()
        first_steps.append((round((time.perf_counter() - t) * 1e3, 2), len(got)))
    return {**result, "first_steps_ms_outputs": first_steps[:5]}


VARIANTS = [
    ("l1", {"async_scheduling": 0}), ("l1", {"async_scheduling": 1, "skinny_gemm": 0}),
    ("l1", {"async_scheduling": 1, "skinny_gemm": 1}),
    ("t1", {"async_scheduling": 0, "triton_sampling": 0}), ("t1", {"async_scheduling": 1, "triton_sampling": 0}),
    ("t1", {"async_scheduling": 0, "triton_sampling": 1}), ("t1", {"async_scheduling": 1, "triton_sampling": 1}),
    ("t1", {"async_scheduling": 1, "triton_sampling": 1, "skinny_gemm": 0}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["correctness", "l1", "t1"], default=None)
    ap.add_argument("--async-scheduling", type=int, default=1)
    ap.add_argument("--triton-sampling", type=int, default=1)
    ap.add_argument("--skinny-gemm", type=int, default=1)
    ap.add_argument("--json", default=None, help="write this variant's result here (used by the driver)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: correctness,l1,t1")
    ap.add_argument("--variants", default="", help="comma-separated indices into VARIANTS to run (default all)")
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(0)}
    if args.only is not None:
        if args.only == "correctness":
            out = record(results, "correctness", correctness)
        elif args.only == "l1":
            out = record(results, "l1", l1_variant, bool(args.async_scheduling), bool(args.skinny_gemm))
        else:
            out = record(results, "t1", t1_variant, bool(args.async_scheduling), bool(args.triton_sampling),
                         bool(args.skinny_gemm))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f)
        return
    skip = set(args.skip.split(","))
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    plan = [("correctness", {})] * ("correctness" not in skip) + [v for v in chosen if v[0] not in skip]
    for index, (name, flags) in enumerate(plan):
        key = name + "".join(f"_{k}={v}" for k, v in flags.items())
        if key in results:  # a variant asked for twice: keep both runs
            key += f"#{index}"
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--only", name, "--json", f.name]
            for k, v in flags.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            proc = subprocess.run(cmd, check=False)
            try:
                results[key] = json.load(open(f.name))
            except (OSError, ValueError):
                results[key] = {"error": f"exit code {proc.returncode}"}
    print(json.dumps(results, indent=1))
    print(f"{'variant':<58} result")
    for key, value in results.items():
        if key.startswith("l1"):
            print(f"{key:<58} TPOT {value.get('tpot_ms', float('nan')):.3f} ms  TTFT {value.get('ttft_ms', 0):.1f} ms")
        elif key.startswith("t1"):
            print(f"{key:<58} {value.get('passes_tok_s')} tok/s (greedy {value.get('greedy_tok_s')})")
    write_results(results, "gpu_async_check.json")


if __name__ == "__main__":
    main()
