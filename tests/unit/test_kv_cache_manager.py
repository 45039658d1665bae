"""Specification of the KV cache manager: per-request block tables grown on demand."""

from __future__ import annotations

import pytest

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(request_id, list(range(num_prompt_tokens)), SamplingParams())


def test_num_blocks_needed_rounds_up() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    assert [manager.get_num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_prompt_allocation_takes_just_enough_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    request = make_request("a", 9)
    new_blocks = manager.allocate_slots(request, 9)
    assert new_blocks is not None and len(new_blocks) == 3
    assert manager.get_block_ids("a") == [b.block_id for b in new_blocks]
    assert manager.num_free_blocks == 5


def test_blocks_grow_one_at_a_time_as_tokens_arrive() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    request = make_request("a", 3)
    allocated_per_token = []
    for _ in range(6):
        new_blocks = manager.allocate_slots(request, 1)
        assert new_blocks is not None
        allocated_per_token.append(len(new_blocks))
        request.num_computed_tokens += 1
    assert allocated_per_token == [1, 0, 0, 0, 1, 0]
    assert len(manager.get_block_ids("a")) == 2


def test_no_new_blocks_while_the_last_block_has_room() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    request = make_request("a", 5)
    manager.allocate_slots(request, 5)
    request.num_computed_tokens = 5
    assert manager.allocate_slots(request, 3) == []


def test_requests_never_share_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=32)
    for name in "abcd":
        manager.allocate_slots(make_request(name, 8), 8)
    all_ids = [i for name in "abcd" for i in manager.get_block_ids(name)]
    assert sorted(all_ids) == list(range(8))


def test_short_pool_returns_none_and_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    request = make_request("a", 4)
    manager.allocate_slots(request, 4)
    request.num_computed_tokens = 4
    other = make_request("b", 12)
    manager.allocate_slots(other, 8)

    assert manager.allocate_slots(request, 5) is None
    assert manager.get_block_ids("a") == [0]
    assert manager.num_free_blocks == 1
    assert manager.allocate_slots(make_request("c", 8), 8) is None
    assert manager.get_block_ids("c") == []


def test_free_releases_every_block_of_the_request() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    request = make_request("a", 10)
    manager.allocate_slots(request, 10)
    manager.free(request)
    assert manager.num_free_blocks == 4
    assert manager.usage == 0.0
    assert manager.get_block_ids("a") == []


def test_free_of_a_request_without_blocks_is_a_no_op() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    manager.free(make_request("never-allocated", 3))
    assert manager.num_free_blocks == 4


def test_free_puts_tail_blocks_ahead_of_prefix_blocks_in_eviction_order() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=4, max_model_len=32)
    request = make_request("a", 12)
    manager.allocate_slots(request, 12)
    manager.free(request)
    assert [b.block_id for b in manager.block_pool.free_block_queue] == [2, 1, 0]


def test_usage_is_the_fraction_of_blocks_held() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    manager.allocate_slots(make_request("a", 8), 8)
    assert manager.usage == 0.5


def test_allocation_beyond_max_model_len_raises() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len=8"):
        manager.allocate_slots(make_request("a", 9), 9)


def test_a_prefix_never_computed_has_no_computed_blocks() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    assert manager.get_computed_blocks(make_request("a", 8)) == ([], 0)


def test_without_caching_a_computed_prefix_is_not_found() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32, enable_caching=False)
    manager.allocate_slots(make_request("a", 8), 8)
    assert manager.get_computed_blocks(make_request("b", 8)) == ([], 0)


def test_computed_blocks_are_shared_not_allocated() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=4, max_model_len=32)
    first = make_request("a", 8)
    manager.allocate_slots(first, 8)
    shared = manager.req_to_blocks["a"][:1]
    second = make_request("b", 8)
    new_blocks = manager.allocate_slots(second, 4, new_computed_blocks=shared)
    assert new_blocks is not None and len(new_blocks) == 1
    assert manager.get_block_ids("b")[0] == manager.get_block_ids("a")[0]
    assert shared[0].ref_cnt == 2
