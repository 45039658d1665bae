"""Property: with prefix caching, every request attends to exactly its own prefix's K/V.

A fake model runner keeps a simulated KV cache in which each slot holds the fingerprint of the
prefix its K/V stands for: (cache salt, all token ids up to and including that position). Every
step it performs the scheduler's block copies, writes the fingerprints of the scheduled tokens,
and then checks every position each scheduled request attends to. Sampling is a deterministic
function of a request's tokens, so the outputs must equal a direct simulation without any
cache. Random streams of requests with shared prefixes, salts, parallel samples (forks) and
aborts run on small pools, so blocks are shared, copied, evicted and preempted.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.kv_cache_utils import hash_partial_block, update_request_block_hashes
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.runner_output import ModelRunnerOutput
from tests.unit.scheduler_harness import make_scheduler, step

VOCAB = 6  # a small vocabulary makes outputs repeat and prompts share prefixes
STOP_TOKEN = 0


def next_token(seed: int, token_ids: list[int]) -> int:
    """The "model": a deterministic function of the sequence (and the sample's seed)."""
    return random.Random(hash((seed, tuple(token_ids)))).randrange(VOCAB)


@dataclass
class SimulatedRequest:
    token_ids: list[int]
    salt: str | None
    seed: int
    block_ids: list[int]
    num_computed_tokens: int


class KVSimulatingRunner:
    """Runs SchedulerOutputs against a simulated paged KV cache and checks what is read."""

    def __init__(self, block_size: int, salts: dict[str, str | None], seeds: dict[str, int]) -> None:
        self.block_size = block_size
        self.salts, self.seeds = salts, seeds
        self.slots: dict[int, tuple] = {}
        self.states: dict[str, SimulatedRequest] = {}

    def slot(self, state: SimulatedRequest, position: int) -> int:
        return state.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    @staticmethod
    def fingerprint(state: SimulatedRequest, position: int) -> tuple:
        return state.salt, tuple(state.token_ids[: position + 1])

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids:
            self.states.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.states[new.req_id] = SimulatedRequest(new.prompt_token_ids + new.output_token_ids,
                                                       self.salts[new.req_id], self.seeds[new.req_id],
                                                       list(new.block_ids), new.num_computed_tokens)
        for cached in out.scheduled_cached_reqs:
            self.states[cached.req_id].block_ids.extend(cached.new_block_ids)
        # Copies first, every source read before any destination is written.
        bs = self.block_size
        copied = {dst: [self.slots.get(src * bs + i) for i in range(bs)] for src, dst in out.blocks_to_copy}
        for dst, values in copied.items():
            for i, value in enumerate(values):
                self.slots.pop(dst * bs + i, None) if value is None else self.slots.__setitem__(dst * bs + i, value)
        # One forward pass: every layer writes all new K/V, then attends.
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            for position in range(state.num_computed_tokens, state.num_computed_tokens + num_tokens):
                self.slots[self.slot(state, position)] = self.fingerprint(state, position)
        req_ids, sampled = [], []
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            end = state.num_computed_tokens + num_tokens
            for position in range(end):
                found = self.slots.get(self.slot(state, position))
                assert found == self.fingerprint(state, position), (
                    f"{req_id} reads wrong K/V at position {position}: {found} "
                    f"instead of {self.fingerprint(state, position)}")
            state.num_computed_tokens = end
            req_ids.append(req_id)
            if end == len(state.token_ids):
                token_id = next_token(state.seed, state.token_ids)
                state.token_ids.append(token_id)
                sampled.append([token_id])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


def expected_output(request: Request, seed: int, max_model_len: int) -> list[int]:
    """What the request generates when nothing is cached: the oracle."""
    token_ids, output = list(request.prompt_token_ids), []
    while True:
        token_id = next_token(seed, token_ids)
        token_ids.append(token_id)
        output.append(token_id)
        params = request.sampling_params
        if (token_id in params.stop_token_ids or len(output) >= request.max_tokens
                or len(token_ids) >= max_model_len):
            return output


class PrefixCachingMachine(RuleBasedStateMachine):
    """Random requests over shared prefixes; K/V reads, outputs and block accounting are checked."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), max_model_len=st.integers(4, 24),
                extra_blocks=st.integers(0, 6), budget=st.integers(1, 24), max_num_seqs=st.integers(1, 5),
                seed=st.integers(0, 2**16))
    def setup(self, block_size: int, max_model_len: int, extra_blocks: int, budget: int,
              max_num_seqs: int, seed: int) -> None:
        self.num_blocks = -(-max_model_len // block_size) + extra_blocks
        self.scheduler = make_scheduler(self.num_blocks, block_size, max_model_len, budget, max_num_seqs,
                                        enable_caching=True)
        self.manager: KVCacheManager = self.scheduler.kv_cache_manager
        self.salts: dict[str, str | None] = {}
        self.seeds: dict[str, int] = {}
        self.runner = KVSimulatingRunner(block_size, self.salts, self.seeds)
        rng = random.Random(seed)
        self.prefixes = [[rng.randrange(VOCAB) for _ in range(max_model_len)] for _ in range(3)]
        self.added: dict[str, Request] = {}
        self.emitted: dict[str, list[int]] = {}

    @rule(burst=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 24), st.lists(st.integers(0, VOCAB - 1),
                                                                                  max_size=6),
                                   st.integers(1, 8), st.sampled_from([None, "salt"]), st.sampled_from([1, 2, 4]),
                                   st.booleans()),
                         min_size=1, max_size=4))
    def add(self, burst: list[tuple[int, int, list[int], int, str | None, int, bool]]) -> None:
        max_model_len = self.scheduler.max_model_len
        for prefix, prefix_len, tail, max_tokens, salt, n, stop in burst:
            prompt = (self.prefixes[prefix][:prefix_len] + tail)[: max_model_len - 1] or [1]
            parent_id = f"p{len(self.added)}"
            for index in range(n):  # n > 1: parallel samples, fanned out as the engine does
                req_id = f"{index}_{parent_id}"
                params = SamplingParams(max_tokens=max_tokens, stop_token_ids=[STOP_TOKEN] if stop else [])
                request = Request(req_id, prompt, params, cache_salt=salt,
                                  fork_source_id=f"0_{parent_id}" if index else None)
                self.salts[req_id], self.seeds[req_id] = salt, index
                self.scheduler.add_request(request)
                self.added[req_id] = request

    @precondition(lambda self: any(r.is_finished() for r in self.added.values()))
    @rule(data=st.data(), tail=st.lists(st.integers(0, VOCAB - 1), max_size=3), max_tokens=st.integers(1, 4))
    def follow_up(self, data: st.DataObject, tail: list[int], max_tokens: int) -> None:
        """A request continuing a finished one (the next turn of a chat, the next step of a beam)."""
        finished = sorted(req_id for req_id, r in self.added.items() if r.is_finished())
        earlier = self.added[data.draw(st.sampled_from(finished))]
        prompt = (earlier.all_token_ids + tail)[: self.scheduler.max_model_len - 1]
        req_id = f"0_f{len(self.added)}"
        request = Request(req_id, prompt, SamplingParams(max_tokens=max_tokens), cache_salt=earlier.cache_salt)
        self.salts[req_id], self.seeds[req_id] = earlier.cache_salt, 0
        self.scheduler.add_request(request)
        self.added[req_id] = request

    @rule(num_steps=st.integers(1, 6))
    def run_steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self.run_one_step()
            self.check_blocks()

    def run_one_step(self) -> None:
        for output in step(self.scheduler, self.runner)[1]:
            self.emitted.setdefault(output.req_id, []).extend(output.new_token_ids)

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)

    @invariant()
    def check_blocks(self) -> None:
        pool, manager = self.manager.block_pool, self.manager
        held = Counter(block for blocks in manager.req_to_blocks.values() for block in blocks)
        assert all(block.ref_cnt == held[block] for block in pool.blocks), "ref_cnt != block tables holding it"
        assert set(pool.free_block_queue) == {block for block in pool.blocks if block.ref_cnt == 0}
        assert all(len(set(blocks)) == len(blocks) for blocks in manager.req_to_blocks.values())
        for block in pool.blocks:
            if block.block_hash is not None:
                assert pool.cached_block_hash_to_block[block.block_hash] is block
        for block_hash, block in pool.cached_block_hash_to_block.items():
            assert block.block_hash == block_hash
            self.assert_block_holds_its_prefix(block)
        for request in self.scheduler.running:
            # Nobody writes into a block someone else holds: partial blocks are never shared.
            blocks = manager.req_to_blocks.get(request.request_id, [])
            if request.num_computed_tokens % manager.block_size:
                assert blocks[request.num_computed_tokens // manager.block_size].ref_cnt == 1

    def assert_block_holds_its_prefix(self, block) -> None:
        """The K/V in a cached block is that of the prefix its hash names."""
        bs = self.manager.block_size
        for num_tokens in range(bs, 0, -1):
            fingerprint = self.runner.slots.get(block.block_id * bs + num_tokens - 1)
            if fingerprint is None or len(fingerprint[1]) % bs != num_tokens % bs:
                continue
            salt, token_ids = fingerprint
            request = Request("check", list(token_ids), SamplingParams(), cache_salt=salt)
            if num_tokens == bs:
                block_hash = update_request_block_hashes(request, bs)[-1]
            else:
                update_request_block_hashes(request, bs)
                block_hash = hash_partial_block(request, bs, len(token_ids))
            if block_hash == block.block_hash:
                start = len(token_ids) - num_tokens
                assert all(self.runner.slots.get(block.block_id * bs + i) == (salt, token_ids[: start + i + 1])
                           for i in range(num_tokens))
                return
        raise AssertionError(f"cached block {block.block_id} does not hold the prefix its hash names")

    def teardown(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        for _ in range(50 * self.scheduler.max_model_len * (len(self.added) + 1)):
            if not self.scheduler.has_unfinished_requests():
                break
            self.run_one_step()
            self.check_blocks()
        assert not self.scheduler.has_unfinished_requests(), "scheduler deadlocked"
        assert self.manager.num_free_blocks == self.num_blocks, "blocks leaked"
        self.runner.execute(self.scheduler.schedule())
        assert self.runner.states == {}
        for req_id, request in self.added.items():
            expected = expected_output(request, self.seeds[req_id], self.scheduler.max_model_len)
            emitted = self.emitted.get(req_id, [])
            if request.status == RequestStatus.FINISHED_ABORTED:
                assert emitted == expected[: len(emitted)]
            else:
                assert emitted == expected, f"{req_id}: {emitted} != {expected}"


TestPrefixCachingProperties = PrefixCachingMachine.TestCase
TestPrefixCachingProperties.settings = settings(max_examples=300, stateful_step_count=30, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
