"""A fake model runner and helpers for scheduler tests: the runner sees only SchedulerOutputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import EngineCoreOutput, SchedulerOutput
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.runner_output import ModelRunnerOutput

# ---- a fake model runner that sees only SchedulerOutputs, like the real one ---------------------


@dataclass
class RunnerState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


class FakeModelRunner:
    """Keeps per-request state from SchedulerOutputs alone and samples like the real runner:
    a request samples one token when its scheduled tokens reach its end."""

    def __init__(self, block_size: int, sample: Callable[[str], int] = lambda req_id: 7) -> None:
        self.block_size = block_size
        self.sample = sample
        self.states: dict[str, RunnerState] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids:
            self.states.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.states, "runner already holds a 'new' request"
            self.states[new.req_id] = RunnerState(
                new.prompt_token_ids + new.output_token_ids, list(new.block_ids), new.num_computed_tokens)
        for cached in out.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
            if cached.last_token_id is not None:  # pipeline stages: the decode's input, known
                assert state.token_ids[cached.num_computed_tokens] == cached.last_token_id
                assert cached.num_computed_tokens == len(state.token_ids) - 1
        for req_id in out.decode_ahead_req_ids:  # a decode ahead: its input is being sampled
            state = self.states[req_id]
            assert out.num_scheduled_tokens[req_id] == 1 and state.num_computed_tokens == len(state.token_ids) - 1
        req_ids, sampled = [], []
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            state.num_computed_tokens += num_tokens
            assert state.num_computed_tokens <= len(state.token_ids)
            assert state.num_computed_tokens <= len(state.block_ids) * self.block_size
            req_ids.append(req_id)
            if state.num_computed_tokens == len(state.token_ids):
                token_id = self.sample(req_id)
                state.token_ids.append(token_id)
                sampled.append([token_id])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 64,
                   max_num_batched_tokens: int = 64, max_num_seqs: int = 16,
                   enable_chunked_prefill: bool = True, enable_caching: bool = False,
                   **config_fields: object) -> Scheduler:
    """A scheduler over its own pool; prefix caching off unless asked (tests/unit/test_prefix_caching.py).
    `config_fields`: further SchedulerConfig fields (e.g. max_concurrent_batches)."""
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                             max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill,
                             **config_fields)  # type: ignore[arg-type]
    return Scheduler(config, KVCacheManager(num_blocks, block_size, max_model_len, enable_caching=enable_caching))


def make_request(request_id: str, num_prompt_tokens: int, max_tokens: int | None = 16,
                 **params: object) -> Request:
    return Request(request_id, [100 + i for i in range(num_prompt_tokens)],
                   SamplingParams(max_tokens=max_tokens, **params))


def step(scheduler: Scheduler, runner: FakeModelRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = scheduler.schedule()
    return out, scheduler.update_from_output(out, runner.execute(out))


def run_to_completion(scheduler: Scheduler, runner: FakeModelRunner,
                      max_steps: int = 1000) -> dict[str, list[EngineCoreOutput]]:
    outputs: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return outputs
        for output in step(scheduler, runner)[1]:
            outputs.setdefault(output.req_id, []).append(output)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def tokens_of(outputs: list[EngineCoreOutput]) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


# ---- admission --------------------------------------------------------------------------------
