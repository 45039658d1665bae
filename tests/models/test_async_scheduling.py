"""Async scheduling (step N+1 launched before step N's tokens are on the host) changes no output.

The synchronous engine is the oracle: same greedy tokens, same seeded samples, same finish
reasons and logprobs, under chunking, preemption, stop tokens and aborts; the pool ends empty.
"""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.models.tiny_models import build_tiny_model, random_prompts


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("llama"))
    build_tiny_model("LlamaForCausalLM", path)
    return path


PROMPTS = random_prompts([1, 5, 16, 17, 33, 60, 100, 150], seed=3)


def _generate(path: str, params: list[SamplingParams], async_scheduling: bool, **engine_args):
    llm = LLM(path, skip_tokenizer_init=True, async_scheduling=async_scheduling, **engine_args)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[: len(params)]], params, use_tqdm=False)
    core = llm.llm_engine.engine_core
    assert core.kv_cache_manager.num_free_blocks == llm.llm_engine.config.cache_config.num_blocks
    assert not core.has_unfinished_requests()
    results = [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]
    return results, core


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    """Greedy and seeded random requests of several lengths; some end on a stop token."""
    return [
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token]),
        SamplingParams(temperature=1.0, seed=11, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=12, max_tokens=30, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=13, n=3, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True, min_tokens=5, stop_token_ids=[stop_token]),
    ]


def _stop_token(path: str) -> int:
    """The 5th greedy token of the third prompt: with it as a stop token that request (at least)
    ends early, mid-run."""
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 3
    results, _ = _generate(path, params, False)
    return results[2][0][0][4]


ENGINE_SETUPS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 7},
    "preempting": {"num_gpu_blocks_override": 14, "max_model_len": 200},
    "no-prefix-caching": {"enable_prefix_caching": False},
}


@pytest.mark.parametrize("setup", sorted(ENGINE_SETUPS))
def test_async_scheduling_gives_the_synchronous_outputs(model_path, setup):
    stop_token = _stop_token(model_path)
    params = _mixed_params(stop_token)
    expected, sync_core = _generate(model_path, params, False, **ENGINE_SETUPS[setup])
    got, async_core = _generate(model_path, params, True, **ENGINE_SETUPS[setup])
    assert got == expected
    assert any(reason == "stop" for output in expected for _, reason, _ in output)
    assert async_core.num_pipelined_steps > 0 and sync_core.num_pipelined_steps == 0
    if setup == "preempting":
        assert async_core.scheduler.num_preemptions > 0


def test_logprobs_are_the_same_with_async_scheduling(model_path):
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)] * 3
    outputs = []
    for async_scheduling in (False, True):
        llm = LLM(model_path, skip_tokenizer_init=True, async_scheduling=async_scheduling)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[2:5]], params, use_tqdm=False)
        outputs.append([(o.prompt_logprobs, o.outputs[0].logprobs) for o in outs])
    assert outputs[0] == outputs[1]


def test_penalties_run_steps_one_at_a_time_with_the_same_outputs(model_path):
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.5)] * 4
    expected, _ = _generate(model_path, params, False)
    got, core = _generate(model_path, params, True)
    assert got == expected
    assert core.num_pipelined_steps == 0  # the penalties read each previous token on the host


def test_aborts_while_a_step_is_in_flight_leave_the_others_unchanged(model_path):
    from pagedllm.config import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine

    def run(async_scheduling: bool) -> dict[str, list[int]]:
        engine = LLMEngine.from_engine_args(EngineArgs(model=model_path, skip_tokenizer_init=True,
                                                       async_scheduling=async_scheduling))
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        tokens: dict[str, list[int]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens[output.request_id] = output.outputs[0].token_ids
            steps += 1
            if steps == 6:
                engine.abort_request(["1", "4", "6"])
        core = engine.engine_core
        assert core.kv_cache_manager.num_free_blocks == engine.config.cache_config.num_blocks
        return {r: t for r, t in tokens.items() if r not in ("1", "4", "6")}

    assert run(True) == run(False)


def test_seeded_draws_depend_on_seed_and_position_only(model_path):
    # Preemption recomputes a request and async scheduling moves when it happens: a seeded
    # request's draws must not change with either (each position re-seeds its generator).
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=30, ignore_eos=True) for i in range(8)]
    roomy, _ = _generate(model_path, params, False)
    preempted, core = _generate(model_path, params, False, **ENGINE_SETUPS["preempting"])
    assert core.scheduler.num_preemptions > 0
    assert preempted == roomy
