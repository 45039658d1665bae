"""Prefix caching and parallel sampling on a tiny model: outputs equal the no-caching engine's.

The engine with --no-enable-prefix-caching is the oracle (tests/models/test_llama_family.py checks
it against Hugging Face); with caching on, greedy outputs must be identical token for token with
shared prefixes, under eviction pressure and under preemption, for random request streams with
aborts, and seeded parallel samples must be the same.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import LLMEngine
from tests.models.tiny_models import VOCAB_SIZE, build_tiny_model

MAX_MODEL_LEN = 192
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("llama"))
    build_tiny_model("LlamaForCausalLM", path)
    return path


def make_llm(path: str, enable_prefix_caching: bool = True, num_blocks: int = 64, **kwargs) -> LLM:
    return LLM(path, skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=num_blocks,
               enable_prefix_caching=enable_prefix_caching, **kwargs)


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Three system prompts (one block-aligned), each followed by several questions."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (16, 37, 70)]
    return [system + [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(1, 25))]
            for system in systems for _ in range(4)]


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_block_leaked(engine: LLMEngine) -> None:
    """Every block free, reference counts zero, and the hash map consistent with the blocks."""
    manager = engine.engine_core.kv_cache_manager
    pool = manager.block_pool
    assert manager.req_to_blocks == {} and manager.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert all(block.block_hash == block_hash for block_hash, block in pool.cached_block_hash_to_block.items())
    assert sum(block.block_hash is not None for block in pool.blocks) == len(pool.cached_block_hash_to_block)


@pytest.fixture(scope="module")
def reference(model_path: str) -> list[list[int]]:
    """Greedy outputs of the shared-prefix workload without prefix caching."""
    return generate(make_llm(model_path, enable_prefix_caching=False, num_blocks=256), shared_prefix_prompts())


def test_greedy_outputs_with_shared_prefixes_equal_caching_off(model_path, reference):
    llm = make_llm(model_path, num_blocks=256)
    prompts = shared_prefix_prompts()
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    again = generate(llm, prompts)
    assert [o.outputs[0].token_ids for o in first] == reference and again == reference
    # Requests admitted together share the blocks the first of them computes in the same step.
    assert [o.num_cached_tokens for o in first] == [0, 16, 16, 16, 0, 32, 32, 32, 0, 64, 64, 64]
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    assert_no_block_leaked(llm.llm_engine)


def test_reset_prefix_cache_makes_the_next_pass_compute_every_prompt(model_path, reference, tmp_path, monkeypatch):
    llm = make_llm(model_path, num_blocks=256)
    prompts = shared_prefix_prompts()
    # The profiler rides along: a trace per rank, covering the pass.
    monkeypatch.setenv("PAGEDLLM_TORCH_PROFILER_DIR", str(tmp_path))
    llm.start_profile()
    assert generate(llm, prompts) == reference
    [trace] = llm.stop_profile()
    assert trace.startswith(str(tmp_path)) and os.path.getsize(trace) > 0
    assert llm.reset_prefix_cache()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    # As on the first pass: only requests admitted together share (nothing from before the reset).
    assert [o.num_cached_tokens for o in outputs] == [0, 16, 16, 16, 0, 32, 32, 32, 0, 64, 64, 64]
    assert_no_block_leaked(llm.llm_engine)


def test_profiling_needs_a_trace_directory(model_path, monkeypatch):
    monkeypatch.delenv("PAGEDLLM_TORCH_PROFILER_DIR", raising=False)
    llm = make_llm(model_path)
    with pytest.raises(RuntimeError, match="PAGEDLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    with pytest.raises(RuntimeError, match="not running"):
        llm.stop_profile()


def test_profiler_records_the_device_only_when_asked(monkeypatch):
    from torch.profiler import ProfilerActivity

    from pagedllm.worker.worker import profiler_activities

    monkeypatch.delenv("PAGEDLLM_TORCH_PROFILER_DEVICE_ONLY", raising=False)
    assert profiler_activities("cuda") == [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    assert profiler_activities("cpu") == [ProfilerActivity.CPU]
    monkeypatch.setenv("PAGEDLLM_TORCH_PROFILER_DEVICE_ONLY", "1")
    assert profiler_activities("cuda") == [ProfilerActivity.CUDA]
    assert profiler_activities("cpu") == [ProfilerActivity.CPU]  # a CPU run has no device side to keep


def test_greedy_outputs_equal_under_eviction_pressure(model_path, reference):
    # 13 blocks hold one 192-token request; the workload's prefixes need far more.
    llm = make_llm(model_path, num_blocks=13, max_num_seqs=2)
    assert generate(llm, shared_prefix_prompts()) == reference
    assert llm.llm_engine.engine_core.kv_cache_manager.block_pool.num_evicted_blocks > 20
    assert_no_block_leaked(llm.llm_engine)


def test_greedy_outputs_equal_under_preemption(model_path, reference):
    llm = make_llm(model_path, num_blocks=13)
    assert generate(llm, shared_prefix_prompts()) == reference
    assert llm.llm_engine.engine_core.scheduler.num_preemptions > 0
    assert_no_block_leaked(llm.llm_engine)


def test_cache_salt_keeps_identical_prompts_apart(model_path):
    llm = make_llm(model_path)
    prompt = list(range(3, 40))
    llm.generate({"prompt_token_ids": prompt, "cache_salt": "alice"}, GREEDY, use_tqdm=False)
    outputs = llm.generate([{"prompt_token_ids": prompt, "cache_salt": "bob"},
                            {"prompt_token_ids": prompt, "cache_salt": "alice"}], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0, 32]
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


# ---- property: random request streams ----------------------------------------------------------

SYSTEM_PROMPTS = [[random.Random(i).randrange(3, VOCAB_SIZE) for _ in range(n)] for i, n in enumerate((20, 45))]


@pytest.fixture(scope="module")
def engines(model_path) -> tuple[LLMEngine, LLMEngine]:
    """(caching on with a small pool, caching off): reused across examples, so stale entries stay."""
    return (make_llm(model_path, num_blocks=12, max_num_seqs=6, max_num_batched_tokens=48).llm_engine,
            make_llm(model_path, enable_prefix_caching=False, num_blocks=128).llm_engine)


stream_requests = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(1, 24), st.integers(0, 4), st.booleans(),
              st.sampled_from([1, 1, 2, 3])),
    min_size=1, max_size=7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=stream_requests, seed=st.integers(0, 2**16))
def test_random_streams_equal_caching_off_and_leak_no_block(engines, requests, seed):
    """(system prompt or none, question length, max_tokens, arrival step, aborted, n) per request.

    Greedy parallel samples all generate the same tokens, but still fork and copy blocks.
    """
    cached_engine, reference_engine = engines
    rng = random.Random(seed)
    prompts = [(SYSTEM_PROMPTS[s] if s < 2 else []) + [rng.randrange(3, VOCAB_SIZE) for _ in range(q)]
               for s, q, *_ in requests]
    params = [SamplingParams(n=n, temperature=0.0, max_tokens=m, ignore_eos=True) for _, _, m, *_, n in requests]
    ids = [f"s{seed}-{i}" for i in range(len(requests))]
    finished: dict[str, list[list[int]]] = {}
    aborted: set[str] = set()
    step = 0
    pending = sorted(range(len(requests)), key=lambda i: requests[i][3])
    while pending or cached_engine.has_unfinished_requests():
        while pending and requests[pending[0]][3] <= step:
            i = pending.pop(0)
            cached_engine.add_request(ids[i], {"prompt_token_ids": prompts[i]}, params[i])
        for i, (*_, arrival, abort, _) in enumerate(requests):
            if abort and step == arrival + 2 and ids[i] not in finished:
                cached_engine.abort_request([ids[i]])
                aborted.add(ids[i])
        for output in cached_engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
        step += 1
    for i, request_id in enumerate(ids):
        reference_engine.add_request(request_id, {"prompt_token_ids": prompts[i]}, params[i])
    expected: dict[str, list[list[int]]] = {}
    while reference_engine.has_unfinished_requests():
        for output in reference_engine.step():
            if output.finished:
                expected[output.request_id] = [c.token_ids for c in output.outputs]
    assert {i: finished[i] for i in ids if i not in aborted} == {i: expected[i] for i in ids if i not in aborted}
    assert_no_block_leaked(cached_engine)


# ---- parallel sampling ----------------------------------------------------------------------------


def test_parallel_samples_with_a_seed_reproduce_and_equal_caching_off(model_path):
    prompt = {"prompt_token_ids": list(range(3, 44))}
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    cached = make_llm(model_path)
    first = cached.generate(prompt, params, use_tqdm=False)[0]
    again = cached.generate(prompt, params, use_tqdm=False)[0]
    off = make_llm(model_path, enable_prefix_caching=False).generate(prompt, params, use_tqdm=False)[0]
    samples = [c.token_ids for c in first.outputs]
    assert samples == [c.token_ids for c in again.outputs] == [c.token_ids for c in off.outputs]
    assert len({tuple(s) for s in samples}) == 4
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 32
    assert_no_block_leaked(cached.llm_engine)


@pytest.mark.parametrize("num_prompt_tokens", [40, 33])
def test_parallel_samples_allocate_the_prompt_blocks_once(model_path, num_prompt_tokens):
    llm = make_llm(model_path)
    engine = llm.llm_engine
    pool = engine.engine_core.kv_cache_manager.block_pool
    max_tokens = 20
    engine.add_request("r", {"prompt_token_ids": list(range(3, 3 + num_prompt_tokens))},
                       SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True))
    max_ref_cnt: Counter[int] = Counter()
    while engine.has_unfinished_requests():
        engine.step()
        for block in pool.blocks:
            max_ref_cnt[block.block_id] = max(max_ref_cnt[block.block_id], block.ref_cnt)
    # Every sample's cache holds prompt + max_tokens - 1 tokens; the full blocks of the first
    # num_prompt_tokens - 1 are shared, the block holding the last prompt token is per sample.
    blocks_per_sample = -(-(num_prompt_tokens + max_tokens - 1) // 16)
    num_shared = (num_prompt_tokens - 1) // 16
    assert pool.num_allocated_blocks == num_shared + 4 * (blocks_per_sample - num_shared)
    assert sorted(max_ref_cnt.values(), reverse=True)[:num_shared + 1] == [4] * num_shared + [1]
    assert_no_block_leaked(engine)

