"""KV cache manager: which blocks each request owns, grown on demand, shared through the prefix cache."""

from __future__ import annotations

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.kv_cache_utils import (
    generate_block_extra_keys,
    hash_block_tokens,
    hash_partial_block,
    update_request_block_hashes,
)
from pagedllm.request import Request

# Stands in a block table for a block freed behind the sliding window (vLLM's null block). It is
# never in the pool nor referenced; its id 0 keeps a block table holding it in range, and the
# attention backends never read it: its tokens lie before every later query's window.
NULL_BLOCK = KVCacheBlock(block_id=0)


class KVCacheManager:
    """The three verbs the scheduler needs: get_computed_blocks, allocate_slots and free.

    Knows nothing about models or devices: a request's block table is a list of block ids,
    and the model runner maps token position p to slot `block_ids[p // block_size] *
    block_size + p % block_size`.

    With `enable_caching` (automatic prefix caching), every full block is registered in the
    pool under its chained hash as soon as it is scheduled, and a new request starts from the
    longest run of cached blocks matching its tokens. Only full blocks are shared: nobody
    writes into them again. A partial block (a freed request's last block, or the last prompt
    block of a running sibling it forks from) is never shared but copied: the request gets a
    fresh block and `blocks_to_copy` tells the runner to copy the K/V into it before the step
    runs (copy-on-write, done at once because the request's next token writes into that block).

    With `sliding_window` set (only when EVERY attention layer slides with at most that window,
    e.g. Mistral; never for models mixing in full-attention layers, such as Gemma), a running
    request's blocks whose tokens all lie before its window are returned to the pool and
    replaced by NULL_BLOCK in its table: the query at position p sees keys p - W + 1 .. p only.
    The freed blocks keep their prefix-cache hashes, so a later request may still hit them
    until they are reused; a sibling whose blocks are partly freed is not forked from.
    """

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, enable_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}.")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}.")
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.block_pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        # req_id -> the request's block table, in token order.
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # req_id -> how many of its leading blocks are registered in (or were taken from) the cache.
        self.num_cached_block: dict[str, int] = {}
        # (src, dst) block copies the runner must do before the next step; see take_blocks_to_copy.
        self.blocks_to_copy: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached prefixes among them)."""
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def get_num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(
        self, request: Request, fork_source: Request | None = None
    ) -> tuple[list[KVCacheBlock], int]:
        """Blocks whose K/V is already computed for the request's prefix, and how many tokens they hold.

        The longest chain of cached full blocks, then a cached partial block extending it; or,
        when longer, the prompt blocks of `fork_source`, a running request with the same prompt
        that has computed at least all but its last prompt token. The last token is always left
        to compute so that the step produces logits. When the token count is not block-aligned,
        the last block returned is a partial block that allocate_slots copies rather than shares.
        Requests asking for prompt logprobs compute their whole prompt and get nothing.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_cache_hit_length = request.num_tokens - 1
        block_hashes = update_request_block_hashes(request, self.block_size)
        computed_blocks: list[KVCacheBlock] = []
        for block_hash in block_hashes[: max_cache_hit_length // self.block_size]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        num_computed_tokens = len(computed_blocks) * self.block_size
        if len(computed_blocks) == max_cache_hit_length // self.block_size:
            partial = self._find_cached_partial_block(request, num_computed_tokens, max_cache_hit_length)
            if partial is not None:
                computed_blocks.append(partial[0])
                num_computed_tokens += partial[1]
        if fork_source is not None:
            num_forked_tokens = min(fork_source.num_computed_tokens, request.num_prompt_tokens - 1)
            source_blocks = self.req_to_blocks[fork_source.request_id][: self.get_num_blocks_needed(num_forked_tokens)]
            # Blocks the source freed behind its window are gone: then rely on the prefix cache.
            if num_forked_tokens > num_computed_tokens and NULL_BLOCK not in source_blocks:
                computed_blocks = source_blocks
                num_computed_tokens = num_forked_tokens
        return computed_blocks, num_computed_tokens

    def _find_cached_partial_block(
        self, request: Request, num_full_tokens: int, max_cache_hit_length: int
    ) -> tuple[KVCacheBlock, int] | None:
        """The cached partial block with the most of the request's tokens after its full blocks."""
        index = num_full_tokens // self.block_size
        parent = request.block_hashes[index - 1] if index > 0 else None
        extra_keys = generate_block_extra_keys(request, index)
        token_ids = request.all_token_ids
        for num_tokens in range(min(self.block_size - 1, max_cache_hit_length - num_full_tokens), 0, -1):
            block_hash = hash_block_tokens(parent, token_ids[num_full_tokens : num_full_tokens + num_tokens],
                                           extra_keys)
            block = self.block_pool.get_cached_block(block_hash)
            if block is not None:
                return block, num_tokens
        return None

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_new_computed_tokens: int | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make the request own slots for `num_computed_tokens + num_new_tokens` tokens.

        Only the missing blocks are allocated, so a decoding request gains one block each time
        it crosses a block boundary. `new_computed_blocks` holding `num_new_computed_tokens`
        tokens (from get_computed_blocks, for a request not yet scheduled; all blocks full when
        the count is left out) are prefix hits: full blocks are shared, a partial last one is
        copied into a new block (copy-on-write).

        Returns the newly allocated blocks (possibly empty), or None, changing nothing else, when
        the pool has too few free blocks: the scheduler then preempts or waits. (With a sliding
        window, blocks that fell out of it are freed first in any case: nothing reads them again.)
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}.")
        self._free_blocks_outside_window(request)
        req_blocks = self.req_to_blocks.get(request.request_id)
        num_computed_tokens = request.num_computed_tokens
        shared_blocks: list[KVCacheBlock] = []
        copy_source: KVCacheBlock | None = None
        num_free_hits = 0
        if new_computed_blocks or num_new_computed_tokens:
            new_computed_blocks = new_computed_blocks or []
            if num_new_computed_tokens is None:
                num_new_computed_tokens = len(new_computed_blocks) * self.block_size
            if req_blocks:
                raise ValueError(
                    f"Request {request.request_id!r} already owns blocks; prefix-cache hits can only "
                    "be added before its first allocation."
                )
            if len(new_computed_blocks) != self.get_num_blocks_needed(num_new_computed_tokens):
                raise ValueError(
                    f"{len(new_computed_blocks)} computed blocks cannot hold exactly {num_new_computed_tokens} "
                    f"tokens in blocks of {self.block_size}; pass what get_computed_blocks returned."
                )
            num_computed_tokens += num_new_computed_tokens
            shared_blocks = new_computed_blocks[: num_new_computed_tokens // self.block_size]
            if len(new_computed_blocks) > len(shared_blocks):
                # A partial hit is copied into the first new block: the next token is written into it.
                copy_source = new_computed_blocks[-1]
            # A hit on a free (cached but unreferenced) block takes it out of the free queue too.
            num_free_hits = sum(1 for block in shared_blocks if block.ref_cnt == 0)
        num_total_tokens = num_computed_tokens + num_new_tokens
        if num_total_tokens > self.max_model_len:
            raise ValueError(
                f"Request {request.request_id!r} asks for {num_total_tokens} KV slots, more than "
                f"max_model_len={self.max_model_len}. The scheduler must cap requests at max_model_len."
            )
        num_new_blocks = (-(-num_total_tokens // self.block_size) - (len(req_blocks) if req_blocks else 0)
                          - len(shared_blocks))
        new_blocks: list[KVCacheBlock] = []
        if num_new_blocks > 0 or shared_blocks:
            if max(num_new_blocks, 0) + num_free_hits > self.block_pool.get_num_free_blocks():
                return None
            self.block_pool.touch(shared_blocks)
            new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
            if copy_source is not None and new_blocks[0] is not copy_source:
                # If the copy source, a free cached block, was handed out again in this very call
                # it still holds its K/V: all copies run before the step writes anything.
                self.blocks_to_copy.append((copy_source.block_id, new_blocks[0].block_id))
            blocks = self.req_to_blocks.setdefault(request.request_id, [])
            blocks.extend(shared_blocks)
            blocks.extend(new_blocks)
        if self.enable_caching:
            num_cached_blocks = self.num_cached_block.get(request.request_id)
            if num_cached_blocks is None:
                num_cached_blocks = self.num_cached_block[request.request_id] = len(shared_blocks)
            # Only blocks whose tokens are all known can be named by a hash.
            num_full_blocks = min(num_total_tokens, request.num_tokens) // self.block_size
            if num_full_blocks > num_cached_blocks:
                self._cache_full_blocks(request, num_cached_blocks, num_full_blocks)
        return new_blocks

    def _free_blocks_outside_window(self, request: Request) -> None:
        """Return the blocks before the request's sliding window to the pool (NULL_BLOCK in their place).

        The next query sits at position num_computed_tokens and sees keys from
        num_computed_tokens - W + 1 on, so every block wholly before that is never read again.
        Newest first, as in `free`: older prefix blocks, the likelier cache hits, are reused last.
        """
        blocks = self.req_to_blocks.get(request.request_id)
        if self.sliding_window is None or not blocks:
            return
        num_skipped_blocks = (request.num_computed_tokens - self.sliding_window + 1) // self.block_size
        freed: list[KVCacheBlock] = []
        for index in range(min(num_skipped_blocks, len(blocks)) - 1, -1, -1):
            if blocks[index] is NULL_BLOCK:
                break  # everything before it was freed by an earlier step
            freed.append(blocks[index])
            blocks[index] = NULL_BLOCK
        self.block_pool.free_blocks(freed)

    def _cache_full_blocks(self, request: Request, num_cached_blocks: int, num_full_blocks: int) -> None:
        """Register the request's blocks that this step fills, so later requests can share them.

        Registered when scheduled, before the step computes them: a request that hits them in
        the same step reads them in the same forward pass, where every layer writes all new K/V
        before it attends.
        """
        blocks = self.req_to_blocks[request.request_id]
        block_hashes = update_request_block_hashes(request, self.block_size)
        for index in range(num_cached_blocks, num_full_blocks):
            self.block_pool.cache_block(blocks[index], block_hashes[index])
        self.num_cached_block[request.request_id] = num_full_blocks

    def _cache_partial_block(self, request: Request, blocks: list[KVCacheBlock]) -> None:
        """Register a finishing request's computed partial last block, to be copied by later hits."""
        # Under async scheduling the last computed position's token may still be unknown here.
        num_tokens = min(request.num_computed_tokens, request.num_tokens)
        index = num_tokens // self.block_size
        if num_tokens % self.block_size == 0 or index >= len(blocks) or blocks[index].ref_cnt != 1:
            return
        update_request_block_hashes(request, self.block_size)
        self.block_pool.cache_block(blocks[index], hash_partial_block(request, self.block_size, num_tokens))

    def free(self, request: Request) -> None:
        """Release every block of the request (on finish, abort or preemption).

        Blocks stay in the prefix cache until their memory is needed. Call it before resetting
        `num_computed_tokens`: that count says how much of the partial last block is valid.
        """
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_block.pop(request.request_id, None)
        if self.enable_caching and blocks:
            self._cache_partial_block(request, blocks)
        # Tail blocks first: they join the free queue earlier and so are evicted before the
        # prompt-prefix blocks, which are the ones other requests are likely to hit.
        self.block_pool.free_blocks(block for block in reversed(blocks) if block is not NULL_BLOCK)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (benchmarks, weight updates); False while requests hold blocks."""
        return self.block_pool.reset_prefix_cache()

    def take_blocks_to_copy(self) -> list[tuple[int, int]]:
        """The (src, dst) copies recorded since the last call, for this step's SchedulerOutput."""
        blocks_to_copy, self.blocks_to_copy = self.blocks_to_copy, []
        return blocks_to_copy

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as block ids (empty if it owns none)."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, [])]
