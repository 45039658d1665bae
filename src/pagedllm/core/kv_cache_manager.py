"""KV cache manager: which blocks each request owns, grown on demand and released at once."""

from __future__ import annotations

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.request import Request


class KVCacheManager:
    """The three verbs the scheduler needs: get_computed_blocks, allocate_slots and free.

    Knows nothing about models or devices: a request's block table is a list of block ids,
    and the model runner maps token position p to slot `block_ids[p // block_size] *
    block_size + p % block_size`.
    """

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}.")
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        # req_id -> the request's block table, in token order.
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds."""
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def get_num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Blocks whose K/V is already cached for the request's prefix, and their token count.

        Prefix caching plugs in here (hash full prompt blocks, look them up in the pool). It
        is off, so nothing is ever cached: returns ([], 0).
        """
        return [], 0

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make the request own slots for `num_computed_tokens + num_new_tokens` tokens.

        Only the missing blocks are allocated, so a decoding request gains one block each time
        it crosses a block boundary. `new_computed_blocks` (from get_computed_blocks, for a
        request not yet scheduled) are prefix-cache hits that are shared, not allocated.

        Returns the newly allocated blocks (possibly empty), or None, changing nothing, when the
        pool has too few free blocks: the scheduler then preempts or waits.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}.")
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        if new_computed_blocks and req_blocks:
            raise ValueError(
                f"Request {request.request_id!r} already owns blocks; prefix-cache hits can only "
                "be added before its first allocation."
            )
        num_total_tokens = (request.num_computed_tokens + len(new_computed_blocks) * self.block_size
                            + num_new_tokens)
        if num_total_tokens > self.max_model_len:
            raise ValueError(
                f"Request {request.request_id!r} asks for {num_total_tokens} KV slots, more than "
                f"max_model_len={self.max_model_len}. The scheduler must cap requests at max_model_len."
            )
        num_new_blocks = (self.get_num_blocks_needed(num_total_tokens) - len(req_blocks)
                          - len(new_computed_blocks))
        # A hit on a free (cached but unreferenced) block takes it out of the free queue too.
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if max(num_new_blocks, 0) + num_free_hits > self.block_pool.get_num_free_blocks():
            return None

        self.block_pool.touch(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        if new_computed_blocks or new_blocks:
            blocks = self.req_to_blocks.setdefault(request.request_id, [])
            blocks.extend(new_computed_blocks)
            blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release every block of the request (on finish, abort or preemption)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        # Tail blocks first: they join the free queue earlier and so are evicted before the
        # prompt-prefix blocks, which are the ones other requests are likely to hit.
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as block ids (empty if it owns none)."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, [])]
