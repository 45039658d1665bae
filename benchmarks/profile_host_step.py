"""Host (Python) time of one engine decode step on the CPU, split by stage.

    PYTHONPATH=src python benchmarks/profile_host_step.py [--num-seqs 256] [--temperature 0.6]
        [--steps 50] [--vocab-size 2048] [--cprofile]

A tiny random Llama (hidden 64, one layer, small vocabulary) keeps the model's own compute
small, so what is left is the engine's per-step host work: scheduling, input preparation,
sampling metadata, sampler, token bookkeeping, update and output processing: the work that
runs between GPU steps on a CUDA machine (docs/benchmarks.md: ~4.7 ms per step at batch 256).
Each stage is timed by wrapping its function at class / module level (cumulative, so nested
stages are also inside their parents); --cprofile prints the top functions of execute_model.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from pagedllm import SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.worker import model_runner as model_runner_module
from pagedllm.worker import sampling_metadata as sampling_metadata_module
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.sampler import Sampler


def tiny_config(vocab_size: int) -> dict[str, Any]:
    """One small Llama layer: the model forward costs little next to the host work."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    }


class StageTimer:
    """Records the wall time of every call of wrapped callables, per stage name."""

    def __init__(self) -> None:
        self.times: dict[str, dict[int, float]] = {}  # stage -> {step: seconds in that step}
        self.step = 0
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: str | None = None) -> None:
        """Replace owner.attr (a class method or a module function) with a timed wrapper."""
        original = getattr(owner, attr)
        label = name or attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                per_step = self.times.setdefault(label, {})
                per_step[self.step] = per_step.get(self.step, 0.0) + time.perf_counter() - start

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        """Put every wrapped callable back."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def build_engine(args: argparse.Namespace, model_dir: str) -> LLMEngine:
    """A CPU engine with num_seqs requests decoding (prompts done, outputs long)."""
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, device="cpu",
        max_model_len=2048, max_num_seqs=args.num_seqs, max_num_batched_tokens=8192))
    rng = random.Random(0)
    for i in range(args.num_seqs):
        prompt = [rng.randrange(3, args.vocab_size) for _ in range(args.prompt_len)]
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=1500, ignore_eos=True)
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    for _ in range(args.warmup_steps):  # prefill, then a few decodes
        engine.step()
    return engine


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` decode steps: per-step total and per stage (ms)."""
    with tempfile.TemporaryDirectory() as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(tiny_config(args.vocab_size), f)
        engine = build_engine(args, model_dir)
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    timer = StageTimer()
    timer.wrap(Scheduler, "schedule")
    timer.wrap(Scheduler, "update_from_output")
    timer.wrap(OutputProcessor, "process_outputs")
    timer.wrap(ModelRunner, "execute_model")
    timer.wrap(model_runner_module, "prepare_inputs")
    # The runner builds its sampling metadata directly or through SamplingMetadataCache.
    timer.wrap(sampling_metadata_module, "build_sampling_metadata")
    if hasattr(model_runner_module, "build_sampling_metadata"):
        timer.wrap(model_runner_module, "build_sampling_metadata")
    if hasattr(sampling_metadata_module, "SamplingMetadataCache"):
        timer.wrap(sampling_metadata_module.SamplingMetadataCache, "get", "sampling_metadata_cache_get")
    timer.wrap(LlamaForCausalLM, "forward", "model_forward")
    timer.wrap(LlamaForCausalLM, "compute_logits")
    timer.wrap(Sampler, "forward", "sampler_forward")
    try:
        for step in range(args.steps):
            timer.step = step
            engine.step()
    finally:
        timer.restore()
    # Medians over steps (a stage absent from a step counts 0): robust to a shared machine's stalls.
    stages = {k: statistics.median(v.get(i, 0.0) for i in range(args.steps)) * 1e3 for k, v in timer.times.items()}
    means = {k: sum(v.values()) / args.steps * 1e3 for k, v in timer.times.items()}
    # What execute_model spends outside the model itself, step by step: the host path this
    # script is about.
    t = timer.times
    stages["execute_model - model - logits"] = statistics.median(
        t["execute_model"].get(i, 0.0) - t["model_forward"].get(i, 0.0) - t["compute_logits"].get(i, 0.0)
        for i in range(args.steps)) * 1e3
    result = {"num_seqs": args.num_seqs, "temperature": args.temperature, "top_p": args.top_p,
              "vocab_size": args.vocab_size, "step_ms_median": statistics.median(step_times) * 1e3,
              "stages_ms": stages, "stages_mean_ms": means}
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    engine.engine_core.shutdown()
    return result


def main() -> None:
    """Parse flags, profile, print the per-stage table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=512, help="context ~ T1's (block tables of ~32 blocks)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = profile(args)
    print(f"batch {args.num_seqs}, temperature {args.temperature}, top_p {args.top_p}, vocab {args.vocab_size}: "
          f"step {result['step_ms_median']:.2f} ms (median)")
    for name, ms in sorted(result["stages_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<32} {ms:8.3f} ms")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
