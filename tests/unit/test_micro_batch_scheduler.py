"""The scheduler with pipeline micro-batches (max_concurrent_batches > 1): steps in flight hold
disjoint sampling requests, split evenly, and carry each request's last token to the runners."""

from __future__ import annotations

from tests.unit.scheduler_harness import make_request, make_scheduler
from tests.unit.test_async_scheduler import _sampled


def _micro_batch_scheduler(max_concurrent_batches: int = 2):
    return make_scheduler(max_concurrent_batches=max_concurrent_batches, include_last_token_ids=True)


def test_running_requests_are_split_between_the_steps_in_flight():
    scheduler = _micro_batch_scheduler()
    for name in "abcd":
        scheduler.add_request(make_request(name, 4, max_tokens=3))
    s1 = scheduler.schedule()  # four prefills (waiting requests are admitted whole)
    assert s1.num_scheduled_tokens == {"a": 4, "b": 4, "c": 4, "d": 4}
    assert scheduler.schedule().is_empty  # every token is still in flight: no decode ahead
    scheduler.update_from_output(s1, _sampled(s1, {"a": 10, "b": 11, "c": 12, "d": 13}))
    s3, s4 = scheduler.schedule(), scheduler.schedule()  # half the running requests each
    assert s3.num_scheduled_tokens == {"a": 1, "b": 1} and s4.num_scheduled_tokens == {"c": 1, "d": 1}
    # The stages that do not sample learn each request's token with its next step.
    assert {c.req_id: c.last_token_id for c in s3.scheduled_cached_reqs} == {"a": 10, "b": 11}
    assert {c.req_id: c.last_token_id for c in s4.scheduled_cached_reqs} == {"c": 12, "d": 13}
    assert scheduler.schedule().is_empty
    scheduler.update_from_output(s3, _sampled(s3, {"a": 20, "b": 21}))
    s5 = scheduler.schedule()
    assert s5.num_scheduled_tokens == {"a": 1, "b": 1}
    assert [c.last_token_id for c in s5.scheduled_cached_reqs] == [20, 21]


def test_without_pipeline_stages_no_last_token_is_sent():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, max_tokens=3))
    s1 = scheduler.schedule()
    scheduler.update_from_output(s1, _sampled(s1, {"a": 10}))
    assert [c.last_token_id for c in scheduler.schedule().scheduled_cached_reqs] == [None]


def test_a_request_preempted_with_its_token_in_flight_resumes_only_once_the_token_is_in():
    # With several steps in flight, a request can be preempted by a later step's schedule()
    # while an earlier step still samples its next token; resumed before that token is in, it
    # would be recomputed without it.
    scheduler = _micro_batch_scheduler(max_concurrent_batches=3)
    x = make_request("x", 4, max_tokens=5)
    scheduler.add_request(x)
    s1 = scheduler.schedule()
    assert x.num_output_placeholders == 1
    scheduler.running.remove(x)
    scheduler._preempt(x)  # as a full pool would, in the schedule() of a later step
    s2 = scheduler.schedule()
    assert "x" not in s2.num_scheduled_tokens and "x" in s2.finished_req_ids
    scheduler.update_from_output(s1, _sampled(s1, {"x": 42}))
    assert x.output_token_ids == [42] and x.num_output_placeholders == 0
    s3 = scheduler.schedule()
    (resumed,) = s3.scheduled_new_reqs
    assert resumed.req_id == "x" and resumed.output_token_ids == [42]
    assert s3.num_scheduled_tokens == {"x": 5}  # prompt and the token, recomputed


def test_with_async_scheduling_a_lone_request_decodes_ahead_of_its_pending_token():
    # One request cannot be split over two steps: with async scheduling the second step decodes
    # it ahead (its input comes from the last stage on the device), so the host's work between
    # steps stays hidden; the first stage learns each token later, by its position.
    scheduler = make_scheduler(max_concurrent_batches=2, include_last_token_ids=True, async_scheduling=True)
    scheduler.add_request(make_request("a", 4, max_tokens=4))
    s1 = scheduler.schedule()
    s2 = scheduler.schedule()
    assert s2.num_scheduled_tokens == {"a": 1} and s2.decode_ahead_req_ids == ["a"]
    assert [c.last_token_id for c in s2.scheduled_cached_reqs] == [None]  # its input is being sampled
    scheduler.update_from_output(s1, _sampled(s1, {"a": 10}))
    s3 = scheduler.schedule()
    assert s3.decode_ahead_req_ids == ["a"] and [c.last_token_id for c in s3.scheduled_cached_reqs] == [None]
    scheduler.update_from_output(s2, _sampled(s2, {"a": 11}))
    scheduler.update_from_output(s3, _sampled(s3, {"a": 12}))
    s4 = scheduler.schedule()  # nothing in flight: a plain decode of the newest token
    assert s4.decode_ahead_req_ids == [] and [c.last_token_id for c in s4.scheduled_cached_reqs] == [12]


def test_with_async_scheduling_micro_batches_still_split_the_running_requests():
    scheduler = make_scheduler(max_concurrent_batches=2, include_last_token_ids=True, async_scheduling=True)
    for name in "abcd":
        scheduler.add_request(make_request(name, 4, max_tokens=8))
    s1 = scheduler.schedule()
    s2 = scheduler.schedule()  # room for half the running requests: two decode ahead
    assert s2.num_scheduled_tokens == {"a": 1, "b": 1} and s2.decode_ahead_req_ids == ["a", "b"]
    scheduler.update_from_output(s1, _sampled(s1, {"a": 10, "b": 11, "c": 12, "d": 13}))
    s3 = scheduler.schedule()  # the requests whose tokens are in go first, and not ahead
    assert s3.num_scheduled_tokens == {"c": 1, "d": 1}
    assert s3.decode_ahead_req_ids == [] and [c.last_token_id for c in s3.scheduled_cached_reqs] == [12, 13]


def test_with_async_scheduling_no_decode_ahead_joins_a_step_of_requests_whose_tokens_are_in():
    # A decode ahead makes the first stage wait for the last stage's sampling: it would stall a
    # step that has other work, so it only runs when nothing else could.
    scheduler = make_scheduler(max_concurrent_batches=2, include_last_token_ids=True, async_scheduling=True)
    for name in "abc":
        scheduler.add_request(make_request(name, 4, max_tokens=8))
    s1 = scheduler.schedule()
    s2 = scheduler.schedule()
    assert s2.num_scheduled_tokens == {"a": 1, "b": 1} and s2.decode_ahead_req_ids == ["a", "b"]
    scheduler.update_from_output(s1, _sampled(s1, {"a": 10, "b": 11, "c": 12}))
    s3 = scheduler.schedule()
    assert s3.num_scheduled_tokens == {"c": 1} and s3.decode_ahead_req_ids == []
    scheduler.update_from_output(s2, _sampled(s2, {"a": 20, "b": 21}))
    s4 = scheduler.schedule()
    assert s4.num_scheduled_tokens == {"a": 1, "b": 1} and s4.decode_ahead_req_ids == []
