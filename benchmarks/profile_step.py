"""Where one engine step's time goes on the GPU (T1 model, mid-run decode at batch 256).

    PYTHONPATH=src python benchmarks/profile_step.py [--num-seqs 256] [--context 600]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def timed(obj, name, bucket):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        bucket[name] = bucket.get(name, 0.0) + time.perf_counter() - t0
        return out

    setattr(obj, name, wrapper)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--model", default=os.path.join(CONFIGS, "qwen3-0.6b"))
    args = ap.parse_args()
    eng = LLMEngine.from_engine_args(EngineArgs(model=args.model, load_format="dummy", skip_tokenizer_init=True,
                                                max_model_len=4096, max_num_seqs=args.num_seqs,
                                                max_num_batched_tokens=16384))
    rng = random.Random(0)
    for i in range(args.num_seqs):
        prompt = [rng.randrange(100, 10000) for _ in range(args.context)]
        eng.add_request(str(i), {"prompt_token_ids": prompt}, SamplingParams(temperature=0.6, max_tokens=4000,
                                                                            ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.engine_core.scheduler.running) or \
            eng.engine_core.scheduler.waiting:
        eng.step()
    for _ in range(10):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 30
    for _ in range(n):
        eng.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / n * 1e3
    bucket: dict[str, float] = {}
    core = eng.engine_core
    runner = core.executor.worker.model_runner
    timed(core.scheduler, "schedule", bucket)
    timed(core.scheduler, "update_from_output", bucket)
    timed(core.executor, "execute_model", bucket)
    timed(eng.output_processor, "process_outputs", bucket)
    timed(runner, "_sample", bucket)
    timed(runner.sampler, "forward", bucket)
    import pagedllm.worker.model_runner as mr
    orig_prepare = mr.prepare_inputs

    def prep(*a, **k):
        t = time.perf_counter()
        out = orig_prepare(*a, **k)
        torch.cuda.synchronize()
        bucket["prepare_inputs"] = bucket.get("prepare_inputs", 0.0) + time.perf_counter() - t
        return out

    mr.prepare_inputs = prep
    graphs = runner.cuda_graphs
    if graphs is not None:
        timed(graphs, "run", bucket)
    for _ in range(n):
        eng.step()
    print(f"step {step_ms:.2f} ms (batch {args.num_seqs}, context ~{args.context + 40})")
    for k, v in sorted(bucket.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<22} {v / n * 1e3:8.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eng.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
