"""Specification of the block pool: reference counts and the LRU free queue."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedllm.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_block_queue]


def test_new_pool_has_every_block_free_in_id_order() -> None:
    pool = BlockPool(4)
    assert pool.get_num_free_blocks() == 4
    assert pool.get_usage() == 0.0
    assert free_ids(pool) == [0, 1, 2, 3]


def test_pool_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_block_zero_is_an_ordinary_block() -> None:
    pool = BlockPool(2)
    assert pool.get_new_blocks(1)[0].block_id == 0


def test_allocated_blocks_have_ref_cnt_one_and_leave_the_free_queue() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.get_num_free_blocks() == 1
    assert pool.get_usage() == 0.75


def test_no_block_is_allocated_twice() -> None:
    pool = BlockPool(6)
    ids = [b.block_id for _ in range(3) for b in pool.get_new_blocks(2)]
    assert sorted(ids) == list(range(6))


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="only 1 of 3 are free"):
        pool.get_new_blocks(2)
    assert pool.get_num_free_blocks() == 1


def test_freed_blocks_return_to_the_pool() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(blocks)
    assert pool.get_num_free_blocks() == 3
    assert all(b.ref_cnt == 0 for b in blocks)


def test_double_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    pool.free_blocks(blocks[:1])
    with pytest.raises(ValueError, match="Double free of KV cache block 0"):
        pool.free_blocks(blocks)
    assert blocks[1].ref_cnt == 1
    assert pool.get_num_free_blocks() == 2


def test_freeing_the_same_block_twice_in_one_call_raises() -> None:
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="Double free"):
        pool.free_blocks([block, block])
    assert block.ref_cnt == 1


def test_freed_blocks_join_the_tail_and_allocation_takes_the_head() -> None:
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([b, a])
    assert free_ids(pool) == [3, 1, 0]
    assert [x.block_id for x in pool.get_new_blocks(2)] == [3, 1]


def test_touched_block_is_freed_only_when_every_reference_is_dropped() -> None:
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert pool.get_num_free_blocks() == 1
    pool.free_blocks([block])
    assert pool.get_num_free_blocks() == 2


def test_touching_a_free_block_takes_it_out_of_the_middle_of_the_queue() -> None:
    pool = BlockPool(3)
    pool.touch([pool.blocks[1]])
    assert pool.blocks[1].ref_cnt == 1
    assert free_ids(pool) == [0, 2]
    assert pool.get_num_free_blocks() == 2


def test_reused_block_loses_its_cached_hash() -> None:
    pool = BlockPool(1)
    (block,) = pool.get_new_blocks(1)
    block.block_hash = 1234
    pool.free_blocks([block])
    assert pool.get_new_blocks(1)[0].block_hash is None


def test_free_queue_rejects_a_block_twice_and_removal_of_an_absent_block() -> None:
    queue = FreeKVCacheBlockQueue([])
    block = KVCacheBlock(block_id=7)
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(block)
    queue.append(block)
    with pytest.raises(ValueError, match="already in the free queue"):
        queue.append(block)
    assert queue.popleft() is block
    with pytest.raises(ValueError, match="No free KV cache block"):
        queue.popleft()


@given(st.lists(st.tuples(st.sampled_from(["append", "popleft", "remove"]), st.integers(0, 7)),
                max_size=60))
def test_free_queue_behaves_like_an_ordered_list(ops: list[tuple[str, int]]) -> None:
    blocks = [KVCacheBlock(block_id=i) for i in range(8)]
    queue = FreeKVCacheBlockQueue(blocks[:4])
    model = [0, 1, 2, 3]
    for op, i in ops:
        if op == "append" and i not in model:
            queue.append(blocks[i])
            model.append(i)
        elif op == "popleft" and model:
            assert queue.popleft().block_id == model.pop(0)
        elif op == "remove" and i in model:
            queue.remove(blocks[i])
            model.remove(i)
        assert [b.block_id for b in queue] == model
        assert len(queue) == len(model)
