"""Specification of the scheduler: continuous batching, chunked prefill, preemption, stops."""

from __future__ import annotations

import pytest

from pagedllm.core.scheduler import Scheduler, SchedulerStats
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.request import RequestStatus
from pagedllm.worker.runner_output import LogprobsLists, ModelRunnerOutput
from tests.unit.scheduler_harness import (FakeModelRunner, make_request, make_scheduler, run_to_completion, step,
                                         tokens_of)


def test_duplicate_id_of_an_unfinished_request_is_rejected() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", 4))


def test_id_of_a_finished_request_can_be_reused() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, max_tokens=1))
    run_to_completion(scheduler, FakeModelRunner(4))
    scheduler.add_request(make_request("a", 4))
    assert scheduler.get_num_unfinished_requests() == 1


def test_prompt_longer_than_max_model_len_is_rejected() -> None:
    scheduler = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len=8"):
        scheduler.add_request(make_request("a", 9))


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        make_scheduler().add_request(make_request("a", 0))


def test_request_that_could_never_fit_the_pool_is_rejected() -> None:
    scheduler = make_scheduler(num_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="pool only has 2 blocks"):
        scheduler.add_request(make_request("a", 6, max_tokens=10))
    scheduler.add_request(make_request("b", 6, max_tokens=3))  # needs 8 slots: fits


# ---- what a step sends to the runner ------------------------------------------------------------


def test_new_request_is_sent_in_full_then_as_cached_with_only_new_block_ids() -> None:
    scheduler, runner = make_scheduler(block_size=4), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 4))
    first, _ = step(scheduler, runner)
    (new,) = first.scheduled_new_reqs
    assert (new.req_id, new.block_ids, new.num_computed_tokens, new.output_token_ids) == ("a", [0], 0, [])
    second, _ = step(scheduler, runner)
    assert second.scheduled_new_reqs == []
    (cached,) = second.scheduled_cached_reqs
    assert (cached.new_block_ids, cached.num_computed_tokens) == ([1], 4)
    third, _ = step(scheduler, runner)
    assert third.scheduled_cached_reqs[0].new_block_ids == []


def test_num_computed_tokens_advances_when_schedule_returns() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 10)
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert request.num_computed_tokens == 10 == request.num_tokens  # so it samples this step


def test_empty_step_when_nothing_is_waiting() -> None:
    out = make_scheduler().schedule()
    assert out.is_empty and out.num_scheduled_tokens == {}


# ---- continuous batching and chunked prefill ----------------------------------------------------


def test_decodes_are_scheduled_before_prefills() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=4), FakeModelRunner(4)
    scheduler.add_request(make_request("decoding", 4))
    step(scheduler, runner)
    scheduler.add_request(make_request("prefilling", 8))
    out, _ = step(scheduler, runner)
    assert list(out.num_scheduled_tokens.items()) == [("decoding", 1), ("prefilling", 3)]


def test_chunked_prefill_splits_a_long_prompt_over_steps() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=4), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 10))
    chunks, outputs = [], []
    for _ in range(3):
        out, step_outputs = step(scheduler, runner)
        chunks.append(out.num_scheduled_tokens["a"])
        outputs.append(step_outputs)
    assert chunks == [4, 4, 2]
    assert outputs[0] == [] and outputs[1] == []  # no token until the whole prompt is computed
    assert outputs[2][0].new_token_ids == [7]


def test_chunked_prefill_shares_a_step_with_decodes() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=5), FakeModelRunner(4)
    scheduler.add_request(make_request("short", 2))
    scheduler.add_request(make_request("long", 12))
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 2, "long": 3}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 1, "long": 4}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 1, "long": 4}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 1, "long": 1}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 1, "long": 1}


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_the_budget_whole() -> None:
    scheduler = make_scheduler(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False)
    runner = FakeModelRunner(4)
    scheduler.add_request(make_request("a", 10, max_tokens=2))
    scheduler.add_request(make_request("b", 16))
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"a": 10}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"a": 1}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"b": 16}


def test_waiting_requests_are_admitted_first_come_first_served() -> None:
    scheduler, runner = make_scheduler(num_blocks=4, block_size=4, max_model_len=16), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 8, max_tokens=4))
    scheduler.add_request(make_request("big", 12, max_tokens=1))
    scheduler.add_request(make_request("small", 2, max_tokens=1))
    out, _ = step(scheduler, runner)
    # "big" does not fit next to "a"; "small" would, but must not overtake it.
    assert out.num_scheduled_tokens == {"a": 8}


def test_max_num_seqs_caps_the_running_requests() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=2), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 4, max_tokens=1))
    scheduler.add_request(make_request("b", 4, max_tokens=3))
    scheduler.add_request(make_request("c", 4, max_tokens=1))
    assert set(step(scheduler, runner)[0].num_scheduled_tokens) == {"a", "b"}
    assert set(step(scheduler, runner)[0].num_scheduled_tokens) == {"b", "c"}


# ---- preemption ---------------------------------------------------------------------------------


def preemption_scenario() -> tuple[Scheduler, FakeModelRunner, SchedulerOutput]:
    """Two requests fill a 2-block pool; the older one's next token needs a third block."""
    scheduler, runner = make_scheduler(num_blocks=2, block_size=4, max_model_len=16), FakeModelRunner(4)
    scheduler.add_request(make_request("old", 4, max_tokens=5))
    scheduler.add_request(make_request("new", 4, max_tokens=5))
    step(scheduler, runner)
    scheduler.add_request(make_request("later", 4, max_tokens=1))
    out, _ = step(scheduler, runner)
    return scheduler, runner, out


def test_preemption_frees_the_newest_request_and_requeues_it_at_the_front() -> None:
    scheduler, _, out = preemption_scenario()
    new = scheduler.requests["new"]
    assert out.num_scheduled_tokens == {"old": 1}
    assert out.finished_req_ids == {"new"}  # the runner drops its state
    assert new.status == RequestStatus.PREEMPTED
    assert (new.num_computed_tokens, new.num_preemptions) == (0, 1)
    assert scheduler.kv_cache_manager.get_block_ids("new") == []
    assert [r.request_id for r in scheduler.waiting] == ["new", "later"]
    assert scheduler.make_stats().num_preemptions == 1


def test_preempted_request_resumes_with_its_output_tokens_and_completes() -> None:
    scheduler, runner, _ = preemption_scenario()
    resumed = None
    while scheduler.has_unfinished_requests() and resumed is None:
        out, _ = step(scheduler, runner)
        resumed = next((r for r in out.scheduled_new_reqs if r.req_id == "new"), None)
    assert resumed is not None
    assert (resumed.output_token_ids, resumed.num_computed_tokens) == ([7], 0)
    run_to_completion(scheduler, runner)
    assert scheduler.kv_cache_manager.num_free_blocks == 2


@pytest.mark.parametrize("max_num_batched_tokens", [3, 16])
def test_smallest_pool_completes_max_model_len_requests(max_num_batched_tokens: int) -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=16,
                               max_num_batched_tokens=max_num_batched_tokens)
    runner = FakeModelRunner(4)
    requests = [make_request(f"r{i}", n, max_tokens=None) for i, n in enumerate([3, 9, 15, 1, 5])]
    for request in requests:
        scheduler.add_request(request)
    run_to_completion(scheduler, runner)
    assert all(r.num_tokens == 16 and r.get_finish_reason() == "length" for r in requests)
    assert scheduler.kv_cache_manager.num_free_blocks == 4


def test_single_request_never_preempts_itself_when_it_fits_the_pool() -> None:
    scheduler, runner = make_scheduler(num_blocks=3, block_size=4, max_model_len=12), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 1, max_tokens=None))
    run_to_completion(scheduler, runner)
    assert scheduler.make_stats().num_preemptions == 0


# ---- stop conditions ----------------------------------------------------------------------------


def test_stop_token_finishes_the_request_with_it_as_stop_reason() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, stop_token_ids=[42]))
    outputs = run_to_completion(scheduler, FakeModelRunner(4, sample=lambda _: 42))["a"]
    assert tokens_of(outputs) == [42]
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == ("stop", 42)


def test_eos_token_finishes_the_request_without_stop_reason() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 4)
    request.sampling_params.update_from_generation_config({2})
    scheduler.add_request(request)
    outputs = run_to_completion(scheduler, FakeModelRunner(4, sample=lambda _: 2))["a"]
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == ("stop", None)


def test_stop_token_is_ignored_before_min_tokens() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, stop_token_ids=[42], min_tokens=3))
    outputs = run_to_completion(scheduler, FakeModelRunner(4, sample=lambda _: 42))["a"]
    assert tokens_of(outputs) == [42, 42, 42]
    assert outputs[-1].finish_reason == "stop"


def test_max_tokens_finishes_the_request_as_length_capped() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, max_tokens=3))
    outputs = run_to_completion(scheduler, FakeModelRunner(4))["a"]
    assert tokens_of(outputs) == [7, 7, 7]
    assert [o.finish_reason for o in outputs] == [None, None, "length"]


def test_max_model_len_finishes_the_request_as_length_capped() -> None:
    scheduler = make_scheduler(max_model_len=12)
    scheduler.add_request(make_request("a", 10, max_tokens=None))
    outputs = run_to_completion(scheduler, FakeModelRunner(4))["a"]
    assert len(tokens_of(outputs)) == 2
    assert outputs[-1].finish_reason == "length"


def test_stop_token_as_the_last_allowed_token_reports_stop() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, max_tokens=1, stop_token_ids=[42]))
    outputs = run_to_completion(scheduler, FakeModelRunner(4, sample=lambda _: 42))["a"]
    assert outputs[-1].finish_reason == "stop"


def test_finished_request_frees_its_blocks_at_once_and_the_runner_hears_next_step() -> None:
    scheduler, runner = make_scheduler(), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 6, max_tokens=1))
    _, outputs = step(scheduler, runner)
    assert outputs[0].finished and scheduler.kv_cache_manager.num_free_blocks == 64
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_outputs_carry_the_runners_logprobs_and_prompt_logprobs() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3, logprobs=1, prompt_logprobs=1))
    out = scheduler.schedule()
    logprobs = LogprobsLists(token_ids=[[7, 7]], logprobs=[[-0.1, -0.1]], ranks=[1])
    prompt_logprobs = LogprobsLists(token_ids=[[101], [102]], logprobs=[[-1.0], [-2.0]], ranks=[3, 4])
    (output,) = scheduler.update_from_output(out, ModelRunnerOutput(
        ["a"], [[7]], logprobs={"a": logprobs}, prompt_logprobs={"a": prompt_logprobs}))
    assert output.new_logprobs is logprobs and output.new_prompt_logprobs is prompt_logprobs


# ---- finishing from outside ---------------------------------------------------------------------


def test_abort_of_a_waiting_request_removes_it_from_the_queue() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=1), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    step(scheduler, runner)
    scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert scheduler.get_num_unfinished_requests() == 1 and not scheduler.waiting
    out, _ = step(scheduler, runner)
    assert "b" not in out.num_scheduled_tokens and "b" not in out.finished_req_ids


def test_abort_of_a_running_request_frees_its_blocks_and_tells_the_runner() -> None:
    scheduler, runner = make_scheduler(), FakeModelRunner(4)
    request = make_request("a", 8)
    scheduler.add_request(request)
    step(scheduler, runner)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert request.get_finish_reason() == "abort"
    assert scheduler.kv_cache_manager.num_free_blocks == 64 and not scheduler.running
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_abort_between_schedule_and_update_drops_the_requests_output() -> None:
    scheduler, runner = make_scheduler(), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 4))
    out = scheduler.schedule()
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update_from_output(out, runner.execute(out)) == []


def test_abort_ignores_unknown_and_already_finished_ids() -> None:
    scheduler, runner = make_scheduler(), FakeModelRunner(4)
    scheduler.add_request(make_request("done", 4, max_tokens=1))
    run_to_completion(scheduler, runner)
    scheduler.finish_requests(["done", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.requests == {}


def test_finish_requests_needs_a_finished_status() -> None:
    with pytest.raises(ValueError, match="finished status"):
        make_scheduler().finish_requests("a", RequestStatus.RUNNING)


def test_stats_snapshot_counts_queues_and_cache_usage() -> None:
    scheduler, runner = make_scheduler(num_blocks=8, max_num_seqs=1), FakeModelRunner(4)
    scheduler.add_request(make_request("a", 8))
    scheduler.add_request(make_request("b", 4))
    step(scheduler, runner)
    assert scheduler.make_stats() == SchedulerStats(num_running=1, num_waiting=1, kv_cache_usage=0.25,
                                                    num_preemptions=0)


# ---- property: random workloads on small pools --------------------------------------------------
