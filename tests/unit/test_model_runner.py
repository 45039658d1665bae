"""The model runner's memory-profiling and warm-up passes run a full-budget prefill and leave no state behind."""

from __future__ import annotations

from pagedllm.config import EngineArgs, create_engine_config
from pagedllm.worker.worker import Worker
from tests.models.tiny_models import build_tiny_model


def test_profile_run_executes_a_full_budget_step_and_cleans_up(tmp_path):
    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    config = create_engine_config(EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, device="cpu"))
    worker = Worker(config)
    worker.load_model()
    runner = worker.model_runner
    cache_bytes = runner.profile_run(num_tokens=100, num_seqs=3)
    assert cache_bytes == (3 * 3) * runner.kv_cache_bytes_per_block()  # 34, 33, 33 tokens -> 3 blocks each
    assert runner.requests == {} and runner.kv_caches == []


def test_profile_step_holds_no_prompt_longer_than_max_model_len(tmp_path):
    """With few sequences and a short max_model_len, the full token budget would be one dummy
    prompt far past max_model_len (on the GPU: an illegal address in the rotary and attention
    kernels at start-up). The profile and warm-up steps are capped at what a step can hold."""
    from pagedllm.worker.model_runner import _dummy_prompt_lengths

    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    config = create_engine_config(EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, device="cpu",
                                             max_num_seqs=2, max_model_len=96))
    sched = config.scheduler_config
    assert sched.max_num_batched_tokens > 2 * 96 and sched.max_step_tokens == 2 * 96
    assert max(_dummy_prompt_lengths(sched.max_step_tokens, sched.max_num_seqs)) == 96
    worker = Worker(config)
    worker.load_model()
    runner = worker.model_runner
    assert runner.profile_run(sched.max_step_tokens, sched.max_num_seqs) == 2 * 6 * runner.kv_cache_bytes_per_block()
    assert runner.requests == {}


def test_warm_up_prefills_through_the_real_pool_and_leaves_no_request_behind(tmp_path):
    from pagedllm import LLM, SamplingParams

    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(tmp_path), skip_tokenizer_init=True,
                                                    num_gpu_blocks_override=12, max_model_len=192).generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, num_gpu_blocks_override=12, max_model_len=192)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    # More dummy tokens than the 12-block pool holds: the dummy prompts share blocks round-robin.
    runner.warm_up(num_tokens=300, num_seqs=4)
    assert runner.requests == {}
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


def test_block_copies_read_every_source_before_writing_any_destination():
    import torch

    from pagedllm.worker.model_runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)  # only the KV pool is needed
    runner.device = torch.device("cpu")
    cache = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2, 1, 1)  # [2, blocks, size, heads, dim]
    before = cache.clone()
    runner.kv_caches = [cache]
    runner._copy_blocks([(0, 1), (1, 2)])  # block 1 is both a destination and a source
    assert torch.equal(cache[:, 1], before[:, 0]) and torch.equal(cache[:, 2], before[:, 1])
    assert torch.equal(cache[:, [0, 3]], before[:, [0, 3]])


def test_shutdown_frees_an_in_process_model_at_once(tmp_path):
    # One device, no worker processes: shutdown must still let the model, KV cache (and on a GPU
    # the CUDA graphs) go, so that a second engine in the same process finds the memory free.
    import gc
    import weakref

    import pytest

    from pagedllm import LLM, SamplingParams

    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    with LLM(str(tmp_path), skip_tokenizer_init=True, num_gpu_blocks_override=12, max_model_len=64) as llm:
        llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=2), use_tqdm=False)
        runner = llm.llm_engine.engine_core.executor.worker.model_runner
        model, cache = weakref.ref(runner.model), weakref.ref(runner.kv_caches[0])
        del runner
    gc.disable()  # what is freed must be freed by shutdown, not by a later collection
    try:
        assert model() is None and cache() is None
        with pytest.raises(RuntimeError, match="shut down"):
            llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=2), use_tqdm=False)
        llm.shutdown()  # twice is fine
    finally:
        gc.enable()
