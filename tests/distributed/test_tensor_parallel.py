"""Tensor parallelism on CPU over gloo: TP=2 (and TP=4) give TP=1's greedy tokens, for the Llama
family, MoE and the other families, through the mp and the Ray executors; a dead worker fails
loudly, naming its rank, and never hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.abstract import WorkerDiedError
from tests.models.test_gpt2_opt import TINY_CONFIGS as GPT2_OPT_CONFIGS
from tests.models.test_gpt2_opt import build_tiny as build_gpt2_or_opt
from tests.models.test_phi3_mixtral import CONFIGS as MOE_AND_PHI3_CONFIGS
from tests.models.tiny_models import SLIDING_WINDOW_CONFIGS, TINY_CONFIGS, build_tiny_model, random_prompts

PROMPTS = random_prompts([1, 5, 16, 17, 33, 40], seed=3)
MAX_TOKENS = 24
CONFIGS: dict[str, dict[str, Any]] = {**TINY_CONFIGS, **MOE_AND_PHI3_CONFIGS,
                                      "Gemma2ForCausalLM": SLIDING_WINDOW_CONFIGS["Gemma2ForCausalLM"],
                                      "SlidingMistral": SLIDING_WINDOW_CONFIGS["MistralForCausalLM"]}
# Small pools and chunks so TP runs also preempt and chunk (the control messages carry all of it).
ENGINE_ARGS = dict(skip_tokenizer_init=True, enforce_eager=True, max_num_batched_tokens=24,
                   num_gpu_blocks_override=6, max_model_len=96)


def _greedy(path: str, **engine_args: Any) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(path, **{**ENGINE_ARGS, **engine_args}) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        core = llm.llm_engine.engine_core
        assert core.kv_cache_manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks
        assert core.scheduler.num_preemptions > 0  # the small pool forced preemption
        # Steps overlap with async scheduling, and with pipeline stages (micro-batches in flight).
        micro_batching = (engine_args.get("pipeline_parallel_size", 1) > 1
                          and engine_args.get("pipeline_micro_batching", True))
        assert (core.num_pipelined_steps > 0) == bool(engine_args.get("async_scheduling") or micro_batching)
    return [o.outputs[0].token_ids for o in outputs]


class _ModelDirs(dict):
    """architecture (or GPT-2/OPT variant) -> directory of a tiny random model, built on first use."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, name: str) -> str:
        path = str(self.factory.mktemp(name))
        if name in GPT2_OPT_CONFIGS:
            build_gpt2_or_opt(name, path)
        elif name == "SlidingMistral":
            build_tiny_model("MistralForCausalLM", path, configs={"MistralForCausalLM": CONFIGS[name]})
        else:
            build_tiny_model(name, path, configs=CONFIGS)
        self[name] = path
        return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> _ModelDirs:
    """Tiny random models shared by the module's tests."""
    return _ModelDirs(tmp_path_factory)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_tp2_mp_gives_tp1_tokens(model_dirs, arch):
    path = model_dirs[arch]
    assert _greedy(path, tensor_parallel_size=2) == _greedy(path)


def test_tp2_mp_with_async_scheduling_gives_tp1_tokens(model_dirs):
    # Step N+1 goes down the ranks' pipes while they still compute step N.
    path = model_dirs["LlamaForCausalLM"]
    assert _greedy(path, tensor_parallel_size=2, async_scheduling=True) == _greedy(path)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "gpt2",
                                  "opt-pre-ln-proj", "Gemma2ForCausalLM", "SlidingMistral"])
def test_tp2_covers_every_family(model_dirs, arch):
    # QKV bias (Qwen2), fused checkpoints (Phi-3), MoE with dense layers (Qwen3-MoE), MHA with
    # learned positions and biases (GPT-2, OPT with embedding projections), soft-capping and
    # alternating windows (Gemma 2), every layer sliding with blocks freed behind the window (Mistral).
    path = model_dirs[arch]
    assert _greedy(path, tensor_parallel_size=2) == _greedy(path)


def test_tp4_replicates_kv_heads(model_dirs):
    # 4 query heads, 2 KV heads: with 4 ranks every KV head lives on two ranks.
    path = model_dirs["Qwen3ForCausalLM"]
    assert _greedy(path, tensor_parallel_size=4) == _greedy(path)


def test_tp2_seeded_sampling_matches_tp1(model_dirs):
    path = model_dirs["LlamaForCausalLM"]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=7)
    results = []
    for tp in (1, 2):
        with LLM(path, **{**ENGINE_ARGS, "num_gpu_blocks_override": 64}, tensor_parallel_size=tp) as llm:
            out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], params, use_tqdm=False)
            results.append([o.outputs[0].token_ids for o in out])
    assert results[0] == results[1]


def test_tp2_samples_from_vocabulary_slices_unless_a_request_needs_whole_rows(model_dirs):
    # Greedy steps sample from each rank's slice of the vocabulary (worker/sharded_sampling.py:
    # no logits all-gather, no broadcast); while the logprobs request runs, its steps gather.
    path = model_dirs["LlamaForCausalLM"]
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)]
    results = []
    for tp in (1, 2):
        with LLM(path, **{**ENGINE_ARGS, "num_gpu_blocks_override": 64}, tensor_parallel_size=tp) as llm:
            out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:3]], params, use_tqdm=False)
            results.append([(o.outputs[0].token_ids, [sorted(lp) for lp in o.outputs[0].logprobs or []]) for o in out])
    assert results[0] == results[1]
    assert len(results[1][1][1]) == 3  # the logprobs came with the gathered steps


def kill_once_running(pid: int, llm: LLM) -> threading.Thread:
    """SIGKILL `pid` from a thread as soon as the engine has a running request."""
    def kill() -> None:
        core = llm.llm_engine.engine_core
        deadline = time.monotonic() + 60
        while not core.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_killed_mp_worker_fails_the_engine_naming_its_rank(model_dirs):
    llm = LLM(model_dirs["LlamaForCausalLM"], skip_tokenizer_init=True, enforce_eager=True, tensor_parallel_size=2,
              num_gpu_blocks_override=64)
    try:
        executor = llm.llm_engine.engine_core.executor
        killer = kill_once_running(executor.processes[1].pid, llm)
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        killer.join(timeout=10)
        assert not any(p.is_alive() for p in executor.processes)  # nothing left behind, nothing hangs
    finally:
        llm.shutdown()


def test_script_without_main_guard_gets_an_error_naming_the_guard(model_dirs, tmp_path):
    # Spawned workers import the main module first; a script that builds its LLM at module level
    # would build it again in every worker, which fails there before the worker's code runs.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pagedllm import LLM\n"
        f"LLM({model_dirs['LlamaForCausalLM']!r}, skip_tokenizer_init=True, enforce_eager=True, "
        "tensor_parallel_size=2, num_gpu_blocks_override=64)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "WorkerDiedError: Worker rank" in done.stderr
    assert 'before the worker\'s own code ran' in done.stderr and '__name__ == "__main__"' in done.stderr


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_shutdown_lets_every_rank_exit_cleanly(model_dirs, layout):
    # The engine serves the group's store (on a port the OS picked) until every rank is gone; no
    # rank may need the kill that follows a 10 s join timeout.
    llm = LLM(model_dirs["LlamaForCausalLM"], skip_tokenizer_init=True, enforce_eager=True, **layout,
              num_gpu_blocks_override=64)
    executor = llm.llm_engine.engine_core.executor
    processes = list(executor.processes)
    assert executor._store.port > 0
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
    llm.shutdown()
    assert [p.exitcode for p in processes] == [0, 0]


def test_tensor_parallel_size_is_checked_against_the_model(model_dirs):
    with pytest.raises(ValueError, match="attention heads"):
        LLM(model_dirs["LlamaForCausalLM"], skip_tokenizer_init=True, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="exceeds the model's 2 decoder layers"):
        LLM(model_dirs["LlamaForCausalLM"], skip_tokenizer_init=True, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="uni"):
        LLM(model_dirs["LlamaForCausalLM"], skip_tokenizer_init=True, tensor_parallel_size=2,
            distributed_executor_backend="uni")


@pytest.mark.parametrize("init_method", ["env://", "tcp://127.0.0.1", "file:///tmp/store"])
def test_distributed_init_method_must_be_tcp_host_port(init_method):
    import torch

    from pagedllm.distributed import get_tp_size, init_distributed_environment

    with pytest.raises(ValueError, match="tcp://host:port"):
        init_distributed_environment(1, 2, init_method, torch.device("cpu"))
    assert get_tp_size() == 1  # nothing was set up
