"""The scheduler under async scheduling: step N+1 is scheduled before step N's tokens are known."""

from __future__ import annotations

from pagedllm.request import RequestStatus
from pagedllm.worker.runner_output import ModelRunnerOutput
from tests.unit.scheduler_harness import make_request, make_scheduler


def _sampled(out, tokens: dict[str, int]) -> ModelRunnerOutput:
    """The runner's output for `out`: `tokens[req_id]` for the requests that sample in it."""
    req_ids = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[[tokens[r]] if r in tokens else [] for r in req_ids])


def test_a_decode_is_scheduled_on_a_placeholder_and_never_past_max_tokens():
    scheduler = make_scheduler()
    request = make_request("r", 4, max_tokens=3)
    scheduler.add_request(request)
    s1 = scheduler.schedule()
    assert s1.num_scheduled_tokens == {"r": 4} and request.num_output_placeholders == 1
    s2 = scheduler.schedule()  # before s1's token is known: decode its placeholder
    assert s2.num_scheduled_tokens == {"r": 1} and request.num_output_placeholders == 2
    scheduler.update_from_output(s1, _sampled(s1, {"r": 10}))
    assert request.output_token_ids == [10] and request.num_output_placeholders == 1
    s3 = scheduler.schedule()
    assert s3.num_scheduled_tokens == {"r": 1}
    scheduler.update_from_output(s2, _sampled(s2, {"r": 11}))
    # 2 tokens known + 1 being sampled = max_tokens: a fourth step would be waste.
    s4 = scheduler.schedule()
    assert s4.num_scheduled_tokens == {}
    outputs = scheduler.update_from_output(s3, _sampled(s3, {"r": 12}))
    assert request.output_token_ids == [10, 11, 12] and outputs[0].finish_reason == "length"
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_blocks


def test_a_stop_token_of_step_n_drops_the_token_of_step_n_plus_1():
    scheduler = make_scheduler()
    request = make_request("r", 4, max_tokens=10, stop_token_ids=[99])
    scheduler.add_request(request)
    s1 = scheduler.schedule()
    s2 = scheduler.schedule()
    outputs = scheduler.update_from_output(s1, _sampled(s1, {"r": 99}))
    assert outputs[0].finish_reason == "stop" and outputs[0].new_token_ids == [99]
    assert scheduler.update_from_output(s2, _sampled(s2, {"r": 5})) == []  # the wasted token
    assert request.output_token_ids == [99]
    assert "r" in scheduler.schedule().finished_req_ids
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_blocks


def test_a_request_preempted_while_its_token_is_in_flight_still_receives_it():
    # 4 blocks of 4 tokens: two requests of 7 tokens each need 2 blocks, their 9th token a third.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_request("old", 7, max_tokens=8), make_request("new", 7, max_tokens=8)
    scheduler.add_request(old)
    scheduler.add_request(new)
    s1 = scheduler.schedule()
    assert s1.num_scheduled_tokens == {"old": 7, "new": 7}
    s2 = scheduler.schedule()  # both decode position 7 (still the second block)
    scheduler.update_from_output(s1, _sampled(s1, {"old": 1, "new": 2}))
    s3 = scheduler.schedule()  # position 8 needs a third block each: "new" is preempted
    assert new.status == RequestStatus.PREEMPTED and "new" not in s3.num_scheduled_tokens
    outputs = scheduler.update_from_output(s2, _sampled(s2, {"old": 3, "new": 4}))
    assert new.output_token_ids == [2, 4] and new.num_output_placeholders == 0
    assert {o.req_id: o.new_token_ids for o in outputs} == {"old": [3], "new": [4]}
    # It resumes from all its tokens, the one that arrived after its preemption included.
    scheduler.update_from_output(s3, _sampled(s3, {"old": 5}))
    scheduler.finish_requests("old", RequestStatus.FINISHED_ABORTED)
    s4 = scheduler.schedule()
    assert s4.scheduled_new_reqs[0].req_id == "new" and s4.scheduled_new_reqs[0].output_token_ids == [2, 4]


def test_a_token_for_an_aborted_request_never_reaches_a_new_request_with_its_id():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 4))
    s1 = scheduler.schedule()
    scheduler.finish_requests("r", RequestStatus.FINISHED_ABORTED)
    reused = make_request("r", 5)
    scheduler.add_request(reused)
    assert scheduler.update_from_output(s1, _sampled(s1, {"r": 9})) == []
    assert reused.output_token_ids == [] and reused.status == RequestStatus.WAITING


def test_requests_reading_their_outputs_keep_steps_one_at_a_time():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("plain", 4))
    assert scheduler.can_schedule_ahead()
    scheduler.add_request(make_request("penalised", 4, repetition_penalty=1.2))
    assert not scheduler.can_schedule_ahead()
    scheduler.finish_requests("penalised", RequestStatus.FINISHED_ABORTED)
    assert scheduler.can_schedule_ahead()
