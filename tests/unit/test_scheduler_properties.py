"""Property test of the scheduler: random request streams keep every block accounted for."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request, RequestStatus
from tests.unit.scheduler_harness import FakeModelRunner, make_request, make_scheduler, step


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort sequences; the block accounting must hold after every step."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), max_model_len=st.integers(2, 20),
                extra_blocks=st.integers(0, 2), budget=st.integers(1, 24), max_num_seqs=st.integers(1, 4),
                chunked=st.booleans(), seed=st.integers(0, 2**16))
    def setup(self, block_size: int, max_model_len: int, extra_blocks: int, budget: int,
              max_num_seqs: int, chunked: bool, seed: int) -> None:
        if not chunked:
            budget = max(budget, max_model_len)
        # The smallest pool that holds one max_model_len request, plus a little.
        self.num_blocks = -(-max_model_len // block_size) + extra_blocks
        self.scheduler = self.build_scheduler(block_size, max_model_len, budget, max_num_seqs, chunked, seed)
        rng = random.Random(seed)
        self.runner = FakeModelRunner(block_size, sample=lambda _: rng.randrange(16))
        self.emitted: dict[str, list[int]] = {}
        self.added: dict[str, Request] = {}

    # Requests arrive in bursts so that small pools run out of blocks and preempt.
    @rule(burst=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 16), st.booleans()),
                         min_size=1, max_size=4))
    def add(self, burst: list[tuple[int, int, bool]]) -> None:
        for prompt_len, max_tokens, stop_on_zero in burst:
            req_id = f"r{len(self.added)}"
            prompt_len = min(prompt_len, self.scheduler.max_model_len)
            request = make_request(req_id, prompt_len, max_tokens,
                                   stop_token_ids=[0] if stop_on_zero else [])
            self.scheduler.add_request(request)
            self.added[req_id] = request

    @rule(num_steps=st.integers(1, 6))
    def run_steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self.run_one_step()
            self.assert_invariants()

    def build_scheduler(self, block_size: int, max_model_len: int, budget: int, max_num_seqs: int,
                        chunked: bool, seed: int) -> Scheduler:
        return make_scheduler(self.num_blocks, block_size, max_model_len, budget, max_num_seqs, chunked)

    def run_one_step(self) -> None:
        for output in step(self.scheduler, self.runner)[1]:
            self.emitted.setdefault(output.req_id, []).extend(output.new_token_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def assert_invariants(self) -> None:
        self.block_accounting_holds()
        self.requests_own_exactly_the_blocks_they_computed()

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(data=st.data())
    def add_duplicate(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        with pytest.raises(ValueError):
            self.scheduler.add_request(make_request(req_id, 1))

    @invariant()
    def block_accounting_holds(self) -> None:
        manager = self.scheduler.kv_cache_manager
        owned = [b for blocks in manager.req_to_blocks.values() for b in blocks]
        free = list(manager.block_pool.free_block_queue)
        assert len({b.block_id for b in owned}) == len(owned), "a block is owned by two requests"
        assert len(owned) + len(free) == manager.num_free_blocks + len(owned) == self.num_blocks
        assert all(b.ref_cnt == 1 for b in owned) and all(b.ref_cnt == 0 for b in free)
        assert set(manager.req_to_blocks) <= {r.request_id for r in self.scheduler.running}

    @invariant()
    def requests_own_exactly_the_blocks_they_computed(self) -> None:
        manager = self.scheduler.kv_cache_manager
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for request in self.scheduler.running:
            num_blocks = manager.get_num_blocks_needed(request.num_computed_tokens)
            assert len(manager.get_block_ids(request.request_id)) == num_blocks
            state = self.runner.states.get(request.request_id)
            if state is not None:
                assert state.block_ids == manager.get_block_ids(request.request_id)
                # The runner computes the scheduler's tokens (as far as both know them).
                known = min(len(state.token_ids), len(request.all_token_ids))
                assert state.token_ids[:known] == request.all_token_ids[:known]
        for request in self.scheduler.waiting:
            assert request.num_computed_tokens == 0 and request.request_id not in manager.req_to_blocks

    def teardown(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        # Every request still unfinished must complete: no deadlock, whatever the pool size.
        for _ in range(50 * self.scheduler.max_model_len * (len(self.added) + 1)):
            if not self.has_work():
                break
            self.run_one_step()
            self.assert_invariants()
        assert not self.has_work(), "scheduler deadlocked"
        assert self.scheduler.kv_cache_manager.num_free_blocks == self.num_blocks
        self.runner.execute(self.scheduler.schedule())  # delivers the last finished ids
        assert self.runner.states == {}, "the runner was never told that some request finished"
        for req_id, request in self.added.items():
            if request.status != RequestStatus.FINISHED_ABORTED:
                assert request.get_finish_reason() in ("stop", "length")
                assert self.emitted.get(req_id, []) == request.output_token_ids


TestSchedulerProperties = SchedulerMachine.TestCase
TestSchedulerProperties.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])


class MicroBatchSchedulerMachine(SchedulerMachine):
    """The same streams with pipeline micro-batches: up to `depth` steps in flight, each applied
    later, oldest first, as EngineCore does (the fake runner executes a step when it is launched),
    with or without async scheduling (decodes ahead of a pending token when a step has room)."""

    def build_scheduler(self, block_size: int, max_model_len: int, budget: int, max_num_seqs: int,
                        chunked: bool, seed: int) -> Scheduler:
        self.depth = 2 + seed % 2
        self.decode_ahead = (seed // 2) % 2 == 1
        self.in_flight: deque = deque()
        return make_scheduler(self.num_blocks, block_size, max_model_len, budget, max_num_seqs, chunked,
                              max_concurrent_batches=self.depth, include_last_token_ids=True,
                              async_scheduling=self.decode_ahead)

    def run_one_step(self) -> None:
        launched = False
        if self.scheduler.has_unfinished_requests() and len(self.in_flight) < self.depth:
            out = self.scheduler.schedule()
            if not out.is_empty or out.finished_req_ids or not self.in_flight:
                self.in_flight.append((out, self.runner.execute(out)))
                launched = not out.is_empty
            # Without decodes ahead, no two steps in flight sample the same request.
            sampling = [set(o.num_scheduled_tokens) & {r for r, n in zip(res.req_ids, res.sampled_token_ids) if n}
                        for o, res in self.in_flight]
            assert self.decode_ahead or sum(map(len, sampling)) == len(set().union(*sampling))
        if not self.in_flight or (launched and len(self.in_flight) < self.depth):
            return
        out, result = self.in_flight.popleft()
        for output in self.scheduler.update_from_output(out, result):
            self.emitted.setdefault(output.req_id, []).extend(output.new_token_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)


TestMicroBatchSchedulerProperties = MicroBatchSchedulerMachine.TestCase
TestMicroBatchSchedulerProperties.settings = TestSchedulerProperties.settings
