"""Specification of automatic prefix caching: block hashes, hits, eviction, copy-on-write, forks."""

from __future__ import annotations

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.kv_cache_utils import hash_block_tokens, update_request_block_hashes
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from tests.unit.scheduler_harness import FakeModelRunner, make_scheduler, step


def make_request(request_id: str, token_ids: list[int], cache_salt: str | None = None,
                 fork_source_id: str | None = None, **params: object) -> Request:
    return Request(request_id, token_ids, SamplingParams(**params), cache_salt=cache_salt,
                   fork_source_id=fork_source_id)


def compute(manager: KVCacheManager, request: Request) -> None:
    """Admit a request the way the scheduler does and mark its whole prompt computed."""
    blocks, num_computed_tokens = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_computed_tokens, blocks,
                                  num_computed_tokens) is not None
    request.num_computed_tokens = request.num_tokens


def ids(blocks: list) -> list[int]:
    return [block.block_id for block in blocks]


# ---- hashes -------------------------------------------------------------------------------------


def test_block_hash_is_chained_so_it_names_the_whole_prefix() -> None:
    base = update_request_block_hashes(make_request("a", list(range(12))), 4)
    same_start = update_request_block_hashes(make_request("b", list(range(8)) + [99, 9, 10, 11]), 4)
    other_start = update_request_block_hashes(make_request("c", [99] + list(range(1, 12))), 4)
    assert len(base) == 3
    assert same_start[:2] == base[:2] and same_start[2] != base[2]
    # Blocks 1 and 2 hold equal tokens, but their prefixes differ.
    assert all(h != b for h, b in zip(other_start, base))


def test_only_full_blocks_are_hashed_and_hashes_grow_with_the_tokens() -> None:
    request = make_request("a", list(range(7)))
    assert len(update_request_block_hashes(request, 4)) == 1
    request.append_output_token_ids([7])
    assert len(update_request_block_hashes(request, 4)) == 2


def test_cache_salt_changes_every_hash() -> None:
    plain = update_request_block_hashes(make_request("a", list(range(8))), 4)
    salted = update_request_block_hashes(make_request("b", list(range(8)), cache_salt="tenant-1"), 4)
    assert all(h != s for h, s in zip(plain, salted))


def test_hash_is_a_sha256_digest_of_parent_tokens_and_extra_keys() -> None:
    digest = hash_block_tokens(None, [1, 2, 3, 4])
    assert isinstance(digest, bytes) and len(digest) == 32
    assert digest == hash_block_tokens(None, (1, 2, 3, 4))
    assert digest != hash_block_tokens(None, [1, 2, 3, 4], ("salt",))
    assert digest != hash_block_tokens(digest, [1, 2, 3, 4])


# ---- hits -----------------------------------------------------------------------------------------


def test_new_request_reuses_the_longest_chain_of_cached_full_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    first = make_request("a", list(range(12)))
    compute(manager, first)
    second = make_request("b", list(range(8)) + [50, 51, 52, 53, 54])
    blocks, num_computed_tokens = manager.get_computed_blocks(second)
    assert (ids(blocks), num_computed_tokens) == (manager.get_block_ids("a")[:2], 8)


def test_a_full_hit_still_leaves_the_last_token_to_compute() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    compute(manager, make_request("a", list(range(8))))
    blocks, num_computed_tokens = manager.get_computed_blocks(make_request("b", list(range(8))))
    assert num_computed_tokens == 4 and len(blocks) == 1


def test_full_block_hits_are_shared_by_reference_count() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    compute(manager, make_request("a", list(range(8))))
    second = make_request("b", list(range(8)) + [60])
    compute(manager, second)
    shared = manager.req_to_blocks["a"]
    assert manager.req_to_blocks["b"][:2] == shared
    assert [block.ref_cnt for block in shared] == [2, 2]
    assert manager.num_free_blocks == 8 - 3


def test_caches_are_kept_apart_by_cache_salt() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    compute(manager, make_request("a", list(range(9)), cache_salt="x"))
    assert manager.get_computed_blocks(make_request("b", list(range(9)), cache_salt="y")) == ([], 0)
    assert manager.get_computed_blocks(make_request("c", list(range(9))))[1] == 0
    assert manager.get_computed_blocks(make_request("d", list(range(9)), cache_salt="x"))[1] == 8


def test_requests_asking_for_prompt_logprobs_compute_their_whole_prompt() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    compute(manager, make_request("a", list(range(9))))
    assert manager.get_computed_blocks(make_request("b", list(range(9)), prompt_logprobs=1)) == ([], 0)


def test_a_block_computed_twice_at_once_is_cached_once() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    first, second = make_request("a", list(range(5))), make_request("b", list(range(5)))
    manager.allocate_slots(first, 5)
    manager.allocate_slots(second, 5)
    (cached,) = manager.block_pool.cached_block_hash_to_block.values()
    assert cached is manager.req_to_blocks["a"][0]
    assert manager.req_to_blocks["b"][0].block_hash is None


# ---- eviction -----------------------------------------------------------------------------------


def test_freed_blocks_stay_cached_until_their_memory_is_needed() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=4, max_model_len=32)
    first = make_request("a", list(range(8)))
    compute(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 3
    assert manager.get_computed_blocks(make_request("b", list(range(9))))[1] == 8
    compute(manager, make_request("c", list(range(100, 112))))  # needs the whole pool
    assert manager.block_pool.num_evicted_blocks == 2
    assert manager.get_computed_blocks(make_request("d", list(range(9)))) == ([], 0)


def test_reset_prefix_cache_forgets_every_prefix_but_never_while_blocks_are_in_use() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    first = make_request("a", list(range(8)))
    compute(manager, first)
    assert not manager.reset_prefix_cache()  # "a" still holds its blocks
    assert manager.block_pool.get_num_cached_blocks() == 2
    manager.free(first)
    assert manager.reset_prefix_cache()
    assert manager.block_pool.get_num_cached_blocks() == 0
    assert all(block.block_hash is None for block in manager.block_pool.blocks)
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert manager.num_free_blocks == 4


def test_eviction_takes_the_least_recently_freed_blocks_a_sequence_tail_first() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    older, newer = make_request("old", list(range(8))), make_request("new", list(range(50, 58)))
    compute(manager, older)
    compute(manager, newer)
    manager.free(older)
    manager.free(newer)
    manager.allocate_slots(make_request("c", list(range(100, 104))), 4)  # evicts one block
    assert manager.get_computed_blocks(make_request("d", list(range(9))))[1] == 4  # old tail gone
    assert manager.get_computed_blocks(make_request("e", list(range(50, 59))))[1] == 8


def test_a_hit_on_a_free_block_counts_against_the_free_blocks_and_changes_nothing_if_short() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=4, max_model_len=32)
    first = make_request("a", list(range(8)))
    compute(manager, first)
    manager.free(first)
    manager.allocate_slots(make_request("other", list(range(100, 104))), 4)  # 2 free, both cached
    second = make_request("b", list(range(8)) + list(range(200, 208)))  # 1 hit + 3 new > 2 free
    blocks, num_computed_tokens = manager.get_computed_blocks(second)
    assert manager.allocate_slots(second, 16 - num_computed_tokens, blocks, num_computed_tokens) is None
    assert manager.num_free_blocks == 2 and manager.get_block_ids("b") == []
    assert all(block.ref_cnt == 0 for block in blocks)


# ---- partial blocks: copy-on-write --------------------------------------------------------------


def test_a_finished_requests_partial_block_is_copied_not_shared() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    first = make_request("a", list(range(6)))
    compute(manager, first)
    full, partial = manager.req_to_blocks["a"]
    manager.free(first)
    second = make_request("b", list(range(6)) + [60])
    blocks, num_computed_tokens = manager.get_computed_blocks(second)
    assert (blocks, num_computed_tokens) == ([full, partial], 6)
    new_blocks = manager.allocate_slots(second, 1, blocks, num_computed_tokens)
    assert manager.req_to_blocks["b"] == [full, new_blocks[0]]
    assert manager.take_blocks_to_copy() == [(partial.block_id, new_blocks[0].block_id)]
    assert manager.take_blocks_to_copy() == []
    assert partial.ref_cnt == 0 and partial.block_hash is not None  # still cached for others


def test_a_partial_block_matches_only_the_same_tokens() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    first = make_request("a", list(range(6)))
    compute(manager, first)
    manager.free(first)
    assert manager.get_computed_blocks(make_request("b", list(range(5)) + [60, 61]))[1] == 4


def test_the_copy_source_handed_out_again_needs_no_copy() -> None:
    manager = KVCacheManager(num_blocks=2, block_size=4, max_model_len=32)
    first = make_request("a", list(range(6)))
    compute(manager, first)
    full, partial = manager.req_to_blocks["a"]
    manager.free(first)  # free queue: partial, full
    second = make_request("b", list(range(6)) + [60])
    blocks, num_computed_tokens = manager.get_computed_blocks(second)
    manager.allocate_slots(second, 1, blocks, num_computed_tokens)
    assert manager.req_to_blocks["b"] == [full, partial]  # reused in place: it already holds the K/V
    assert manager.take_blocks_to_copy() == [] and partial.block_hash is None


def test_a_preempted_request_resumes_from_its_cached_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    request = make_request("a", list(range(10)))
    compute(manager, request)
    manager.free(request)
    request.num_computed_tokens = 0
    request.append_output_token_ids([77])
    assert manager.get_computed_blocks(request)[1] == 10


# ---- the scheduler ------------------------------------------------------------------------------


def test_num_cached_tokens_and_prefix_cache_stats_report_hits() -> None:
    scheduler, runner = make_scheduler(block_size=4, enable_caching=True), FakeModelRunner(4)
    scheduler.add_request(make_request("a", list(range(10)), max_tokens=2))
    scheduler.add_request(make_request("b", list(range(10)) + [50], max_tokens=2))
    outputs = {o.req_id: o for _ in range(3) for o in step(scheduler, runner)[1]}
    assert (outputs["a"].num_cached_tokens, outputs["b"].num_cached_tokens) == (0, 8)
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (21, 8)


def test_prefix_cache_stats_stay_zero_with_caching_off() -> None:
    scheduler, runner = make_scheduler(block_size=4), FakeModelRunner(4)
    for name in "ab":
        scheduler.add_request(make_request(name, list(range(10)), max_tokens=1))
    step(scheduler, runner)
    assert (scheduler.make_stats().prefix_cache_queries, scheduler.make_stats().prefix_cache_hits) == (0, 0)


def test_parallel_samples_wait_for_their_first_sibling_then_fork_its_prompt() -> None:
    scheduler, runner = make_scheduler(block_size=4, enable_caching=True), FakeModelRunner(4)
    scheduler.add_request(make_request("0_r", list(range(6)), max_tokens=4))
    scheduler.add_request(make_request("1_r", list(range(6)), fork_source_id="0_r", max_tokens=4))
    first, _ = step(scheduler, runner)
    assert first.num_scheduled_tokens == {"0_r": 6}
    second, _ = step(scheduler, runner)
    assert second.num_scheduled_tokens == {"0_r": 1, "1_r": 1}
    (forked,) = second.scheduled_new_reqs
    source_blocks = scheduler.kv_cache_manager.get_block_ids("0_r")
    assert forked.num_computed_tokens == 5
    assert forked.block_ids[0] == source_blocks[0]  # the full prompt block is shared
    assert second.blocks_to_copy == [(source_blocks[1], forked.block_ids[1])]  # the partial one copied
    assert scheduler.requests["1_r"].num_cached_tokens == 5


def test_a_sample_whose_sibling_finished_takes_the_prompts_full_blocks_from_the_cache() -> None:
    scheduler, runner = make_scheduler(block_size=4, enable_caching=True, max_num_seqs=1), FakeModelRunner(4)
    scheduler.add_request(make_request("0_r", list(range(6)), max_tokens=1))
    scheduler.add_request(make_request("1_r", list(range(6)), fork_source_id="0_r", max_tokens=1))
    step(scheduler, runner)
    second, outputs = step(scheduler, runner)
    # The sibling's partial block cached 2 tokens; a lookup matches partial blocks only whole.
    assert second.num_scheduled_tokens == {"1_r": 2}
    assert outputs[0].num_cached_tokens == 4 and second.blocks_to_copy == []


def test_other_requests_overtake_a_waiting_sample() -> None:
    scheduler, runner = make_scheduler(block_size=4, enable_caching=True), FakeModelRunner(4)
    scheduler.add_request(make_request("0_r", list(range(6)), max_tokens=2))
    scheduler.add_request(make_request("1_r", list(range(6)), fork_source_id="0_r", max_tokens=2))
    scheduler.add_request(make_request("other", [40, 41], max_tokens=2))
    first, _ = step(scheduler, runner)
    assert first.num_scheduled_tokens == {"0_r": 6, "other": 2}
    assert [r.request_id for r in scheduler.waiting] == ["1_r"]


def test_without_caching_samples_do_not_wait_or_share() -> None:
    scheduler, runner = make_scheduler(block_size=4), FakeModelRunner(4)
    scheduler.add_request(make_request("0_r", list(range(6)), max_tokens=2))
    scheduler.add_request(make_request("1_r", list(range(6)), fork_source_id="0_r", max_tokens=2))
    first, _ = step(scheduler, runner)
    assert first.num_scheduled_tokens == {"0_r": 6, "1_r": 6}
    assert first.blocks_to_copy == []


def test_aborting_the_fork_source_releases_the_waiting_sample() -> None:
    scheduler, runner = make_scheduler(block_size=4, enable_caching=True, max_num_batched_tokens=4), \
        FakeModelRunner(4)
    scheduler.add_request(make_request("0_r", list(range(10)), max_tokens=2))
    scheduler.add_request(make_request("1_r", list(range(10)), fork_source_id="0_r", max_tokens=2))
    step(scheduler, runner)  # 4 of 10 prompt tokens
    scheduler.finish_requests("0_r", RequestStatus.FINISHED_ABORTED)
    out, _ = step(scheduler, runner)
    assert out.num_scheduled_tokens == {"1_r": 4}
    assert scheduler.requests["1_r"].num_cached_tokens == 4
