"""Single-stream latency (workload L1): time to first token and time per output token.

`pagedllm bench latency --model benchmarks/configs/llama-3.1-8b --load-format dummy`
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from pagedllm.config import EngineArgs


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    """Workload flags of the latency benchmark."""
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--output-json", type=str, default=None)


def measure_latency(engine: Any, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """Run one batch to completion, timing when each step's tokens come back.

    TTFT is the time until the first tokens arrive, TPOT the gap between successive arrivals.
    With async scheduling a step returns the previous step's tokens, so both are timed at the
    arrivals rather than per call of `step()`.
    """
    from pagedllm.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"lat-{time.monotonic_ns()}-{i}", {"prompt_token_ids": prompt}, params)
    arrivals: list[float] = []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        if engine.step():
            arrivals.append(time.perf_counter())
    total = time.perf_counter() - start
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft_s": arrivals[0] - start, "tpot_median_s": statistics.median(gaps),
            "tpot_mean_s": statistics.fmean(gaps), "e2e_s": total}


def run_latency_cli(args: argparse.Namespace) -> int:
    """Measure L1-style latency and print a one-line table."""
    from pagedllm.engine.llm_engine import LLMEngine

    engine_args = EngineArgs.from_cli_args(args)
    engine_args.skip_tokenizer_init = True
    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(engine_args)
    startup = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = engine.config.model_config.vocab_size
    prompts = [[rng.randrange(100, min(vocab, 10000)) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    measure_latency(engine, prompts, 8)  # warm-up
    runs = [measure_latency(engine, prompts, args.output_len) for _ in range(args.num_iters)]
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result.update(startup_s=startup, model=engine_args.resolved_model(), dtype=engine.config.model_config.dtype,
                  device=engine.config.device, batch_size=args.batch_size, input_len=args.input_len,
                  output_len=args.output_len, enforce_eager=engine_args.enforce_eager)
    print(f"{'startup s':>10} {'TTFT ms':>9} {'TPOT ms (median)':>17} {'e2e s':>7}")
    print(f"{startup:>10.1f} {result['ttft_s'] * 1e3:>9.2f} {result['tpot_median_s'] * 1e3:>17.3f} {result['e2e_s']:>7.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
