"""The pool of KV cache blocks: reference counts, the free queue (LRU eviction order), and the
prefix cache's hash -> block map."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(eq=False)
class KVCacheBlock:
    """One block of the paged KV cache: `block_size` token slots in every layer's cache tensor.

    `ref_cnt` counts the requests whose block table holds the block; a block is in the free
    queue exactly when `ref_cnt == 0`. A free block that still has a `block_hash` is a cached
    prefix: a later request can take it back until the block is reused (evicted). Identity, not
    value, equality: two blocks are never equal.
    """

    block_id: int
    ref_cnt: int = 0
    # Hash of the block's tokens and prefix (core/kv_cache_utils.py) while the prefix cache holds it.
    block_hash: bytes | None = None
    # Intrusive links of the free queue: None while the block is not in it.
    prev_free_block: KVCacheBlock | None = None
    next_free_block: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeKVCacheBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove-from-middle.

    The order is the eviction order for prefix caching: freed blocks join at the tail and
    allocation takes from the head, so the least recently freed block is reused first, and a
    cached block that gets a prefix hit can be taken out of the middle in O(1). The links live
    in the blocks themselves, so no per-node objects are allocated on the hot path.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        # Sentinels remove every "is the list empty / is this the end" branch from the links.
        self._head = KVCacheBlock(block_id=-1)
        self._tail = KVCacheBlock(block_id=-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        """Remove and return the block at the head (the next one to allocate)."""
        block = self._head.next_free_block
        if block is self._tail or block is None:
            raise ValueError("No free KV cache block is left to pop.")
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        """Add a block at the tail (the last one to be reused)."""
        if block.prev_free_block is not None or block.next_free_block is not None:
            raise ValueError(f"{block} is already in the free queue.")
        last = self._tail.prev_free_block
        assert last is not None  # sentinel invariant, not a user-facing condition
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        """Take a block out of the queue wherever it is."""
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue.")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = None
        block.next_free_block = None
        self.num_free_blocks -= 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Free blocks from head to tail (for tests and debugging; O(n))."""
        block = self._head.next_free_block
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free_block


class BlockPool:
    """Owns every KV cache block: hands out free ones, takes them back when unreferenced.

    Also the prefix cache's index: `cached_block_hash_to_block` maps a hash to the block holding
    that prefix's K/V. Freed blocks keep their hash; one is evicted (its hash dropped) only when
    the free queue hands it out again, so the least recently freed cached block goes first.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"A block pool needs at least one block, got num_blocks={num_blocks}.")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}
        # Blocks taken from the free queue since the pool was created (for memory accounting).
        self.num_allocated_blocks = 0
        # Cached blocks whose hash was dropped to reuse their memory.
        self.num_evicted_blocks = 0

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the head of the free queue, each with ref_cnt 1."""
        if num_blocks < 0:
            raise ValueError(f"Cannot allocate a negative number of blocks ({num_blocks}).")
        if num_blocks > self.free_block_queue.num_free_blocks:
            raise ValueError(
                f"Cannot allocate {num_blocks} KV cache blocks: only "
                f"{self.free_block_queue.num_free_blocks} of {self.num_blocks} are free. "
                "Check get_num_free_blocks() first, or give the cache more blocks."
            )
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            # Reusing a block evicts whatever cached prefix it held.
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        self.num_allocated_blocks += num_blocks
        return new_blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
            self.num_evicted_blocks += 1
        block.block_hash = None

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        """The block holding the prefix with this hash, if the cache still has it."""
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> bool:
        """Register a block whose K/V is (or is being) computed under its prefix hash.

        Returns False, changing nothing, when the block is already registered or another block
        holds the same prefix (two requests computed it at once): the first copy stays cached and
        this one is simply never found by a lookup.
        """
        if block.block_hash is not None or block_hash in self.cached_block_hash_to_block:
            return False
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block
        return True

    def get_num_cached_blocks(self) -> int:
        """Blocks the prefix cache can currently find (referenced or free)."""
        return len(self.cached_block_hash_to_block)

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks left unreferenced join the free queue's tail.

        The order matters for eviction: blocks given first are reused first. Raises ValueError,
        changing nothing, if a block would be freed more often than it is referenced.
        """
        blocks = list(blocks)
        # Check everything before touching anything so a double free leaves the pool intact.
        for block, count in Counter(blocks).items():
            if block.ref_cnt < count:
                raise ValueError(
                    f"Double free of KV cache block {block.block_id}: freed {count} time(s) but its "
                    f"ref_cnt is {block.ref_cnt}. A request's blocks must be freed exactly once."
                )
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add one reference to each block (sharing); a free block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                # A free block still holding a cached prefix is being reused by a hit.
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix hash; refused (False, nothing changed) while a block is in use.

        Refusing keeps a running request's registered blocks consistent with the index.
        """
        if self.free_block_queue.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    def get_num_free_blocks(self) -> int:
        """Number of blocks in the free queue."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of the pool referenced by some request, in [0, 1]."""
        return 1.0 - self.free_block_queue.num_free_blocks / self.num_blocks
