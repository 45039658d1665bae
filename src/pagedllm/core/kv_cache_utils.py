"""Prefix-caching hashes: each block of a request is named by a hash chained from its parent's.

A block's hash covers its parent block's hash, its own token ids, and extra keys (the request's
`cache_salt` on the first block). Chaining makes one hash stand for the whole prefix up to the
end of the block, so two requests share a block exactly when their token prefixes (and salts)
agree. The hash is SHA-256, a cryptographic hash: a collision, which would silently serve one
prompt's K/V to another, is out of reach, and no token ids need to be stored and compared.

Full blocks are hashed over `block_size` tokens. A request's partial last block can be hashed too
(`hash_partial_block`, over fewer tokens), so a later request extending the same tokens (the next
step of a beam, the next turn of a chat) can copy it instead of recomputing it; the different
token count keeps partial and full hashes apart.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Any

from pagedllm.request import Request

# The SHA-256 digest of a block (32 bytes).
BlockHash = bytes


def hash_block_tokens(
    parent_block_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockHash:
    """SHA-256 of (parent hash, token ids, extra keys): equal hashes mean equal prefixes."""
    payload = pickle.dumps((parent_block_hash, tuple(token_ids), extra_keys), protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(payload).digest()


def generate_block_extra_keys(request: Request, block_index: int) -> tuple[Any, ...] | None:
    """Extra keys of one block of the request: its cache_salt on the first block, else none.

    The salt only needs to enter the first hash: every later hash is chained from it.
    """
    if block_index == 0 and request.cache_salt is not None:
        return (request.cache_salt,)
    return None


def update_request_block_hashes(request: Request, block_size: int) -> list[BlockHash]:
    """Extend `request.block_hashes` to one hash per full block of its tokens, and return it.

    Hashes are computed once per block and kept on the request: tokens are only ever
    appended, so earlier hashes never change (not even across preemption).
    """
    block_hashes = request.block_hashes
    num_full_blocks = request.num_tokens // block_size
    parent = block_hashes[-1] if block_hashes else None
    token_ids = request.all_token_ids
    for index in range(len(block_hashes), num_full_blocks):
        start = index * block_size
        parent = hash_block_tokens(parent, token_ids[start : start + block_size],
                                   generate_block_extra_keys(request, index))
        block_hashes.append(parent)
    return block_hashes


def hash_partial_block(request: Request, block_size: int, num_tokens: int) -> BlockHash:
    """Hash of the partial block holding the request's tokens up to `num_tokens` (not block-aligned).

    Needs `request.block_hashes` to cover the full blocks before it (update_request_block_hashes).
    """
    index, start = num_tokens // block_size, (num_tokens // block_size) * block_size
    if num_tokens == start:
        raise ValueError(f"{num_tokens} tokens fill whole blocks of {block_size}: there is no partial block.")
    parent = request.block_hashes[index - 1] if index > 0 else None
    return hash_block_tokens(parent, request.all_token_ids[start:num_tokens],
                             generate_block_extra_keys(request, index))
