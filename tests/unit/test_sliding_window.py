"""Sliding windows: which layers slide, the torch backend's window / soft cap against a dense
reference, and the KV cache manager freeing blocks behind the window."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import torch_backend
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.core.kv_cache_manager import NULL_BLOCK, KVCacheManager
from pagedllm.models.sliding_window import kv_cache_sliding_window, layer_sliding_windows
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

# ---------------------------------------------------------------- which layers slide


@pytest.mark.parametrize(("config", "expected"), [
    (dict(model_type="mistral", sliding_window=8), [8, 8, 8, 8]),
    (dict(model_type="mistral", sliding_window=None), [None] * 4),
    (dict(model_type="gemma2", sliding_window=8), [8, None, 8, None]),
    (dict(model_type="gemma3_text", sliding_window=8, sliding_window_pattern=3), [8, 8, None, 8]),
    (dict(model_type="gemma3_text", sliding_window=8), [8, 8, 8, 8]),  # pattern 6 by default
    (dict(model_type="qwen2", sliding_window=8, use_sliding_window=False, max_window_layers=1), [None] * 4),
    (dict(model_type="qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=1), [None, 8, 8, 8]),
    (dict(model_type="gemma2", sliding_window=8,
          layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
     [None, 8, 8, None]),
])
def test_layer_windows_follow_the_config(config: dict, expected: list[int | None]) -> None:
    config = dict(config, num_hidden_layers=4)
    assert layer_sliding_windows(config) == expected
    assert kv_cache_sliding_window(config) == (8 if expected == [8] * 4 else None)


def test_unknown_layer_types_are_rejected() -> None:
    config = dict(num_hidden_layers=2, sliding_window=8, layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(ValueError, match="chunked_attention"):
        layer_sliding_windows(config)


# ---------------------------------------------------------------- torch backend vs dense attention


def _dense_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context_len: int,
                     scale: float, window: int | None, soft_cap: float | None) -> torch.Tensor:
    """Hugging Face's eager attention for one request: scores, soft cap, then the causal window mask."""
    group = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = query.transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, q, L]
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    q_pos = torch.arange(context_len, context_len + query.shape[0])[:, None]
    kv_pos = torch.arange(keys.shape[0])[None, :]
    visible = (kv_pos <= q_pos) & ((kv_pos > q_pos - window) if window is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)


def _random_step(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step of two decodes and three prefill chunks over a shuffled paged cache:
    (query, kv_cache, metadata); block size 4, 2 KV heads of 2 query heads, head dim 8."""
    gen = torch.Generator().manual_seed(seed)
    block_size, num_kv_heads, group, head_dim = 4, 2, 2, 8
    query_lens, seq_lens = [1, 1, 9, 5, 14], [23, 3, 30, 5, 14]  # decodes first, then prefill chunks
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(seq_lens), max(-(-n // block_size) for n in seq_lens), dtype=torch.int64)
    for i, n in enumerate(seq_lens):
        for b in range(-(-n // block_size)):
            block_tables[i, b] = pool.pop()
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    query = torch.randn(qsl[-1], num_kv_heads * group, head_dim, generator=gen) * 3
    metadata = AttentionMetadata(
        num_actual_tokens=qsl[-1], num_decodes=2, query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens), slot_mapping=torch.full((qsl[-1],), -1), block_tables=block_tables,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens)
    return query, kv_cache, metadata


@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (1, None), (6, None), (13, 3.0), (None, 3.0)])
def test_torch_backend_matches_dense_attention(window: int | None, soft_cap: float | None) -> None:
    query, kv_cache, metadata = _random_step()
    qsl, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    out = torch_backend.paged_attention(query, kv_cache, metadata, 0.3, sliding_window=window,
                                        logits_soft_cap=soft_cap)
    for i, seq_len in enumerate(seq_lens):
        keys, values = torch_backend.gather_kv(kv_cache, metadata.block_tables[i], seq_len)
        expected = _dense_reference(query[qsl[i]:qsl[i + 1]], keys, values, seq_len - (qsl[i + 1] - qsl[i]), 0.3,
                                    window, soft_cap)
        assert torch.allclose(out[qsl[i]:qsl[i + 1]], expected, atol=1e-5), i


def test_layers_of_one_step_share_one_decode_plan_per_window() -> None:
    # Gemma-style layers alternate a window and full attention over one step's metadata: each
    # window's gather plan is built once, and every layer's answer equals a fresh computation.
    query, kv_cache, metadata = _random_step()
    for layer, window in enumerate([6, None, 6, None]):
        _, _, fresh = _random_step()
        expected = torch_backend.paged_attention(query, kv_cache, fresh, 0.3, sliding_window=window)
        out = torch_backend.paged_attention(query, kv_cache, metadata, 0.3, sliding_window=window)
        assert torch.equal(out, expected), layer
    assert len(metadata.backend_cache) == 2  # one plan per window, built by its first layer


# ---------------------------------------------------------------- freeing blocks behind the window


def _request(num_tokens: int, request_id: str = "a") -> Request:
    return Request(request_id, list(range(num_tokens)), SamplingParams())


def test_blocks_before_the_window_are_freed_and_replaced_by_the_null_block() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64, sliding_window=6)
    request = _request(20)
    manager.allocate_slots(request, 20)
    assert manager.num_free_blocks == 11
    request.num_computed_tokens = 20
    # The query at 20 sees keys 15..20: blocks 0-2 (tokens 0..11) are never read again; block 3 is.
    manager.allocate_slots(request, 1)
    table = manager.req_to_blocks["a"]
    assert table[:3] == [NULL_BLOCK] * 3 and NULL_BLOCK not in table[3:]
    assert len(table) == 6 and manager.num_free_blocks == 16 - 3
    manager.free(request)
    assert manager.num_free_blocks == 16


def test_freed_window_blocks_stay_in_the_prefix_cache_until_reused() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64, sliding_window=4)
    first = _request(17)
    manager.allocate_slots(first, 17)
    first.num_computed_tokens = 17
    manager.allocate_slots(first, 1)
    assert manager.req_to_blocks["a"][:3] == [NULL_BLOCK] * 3
    # A second request with the same prompt hits all four full blocks, freed ones included.
    second = _request(17, "b")
    blocks, num_tokens = manager.get_computed_blocks(second)
    assert num_tokens == 16 and NULL_BLOCK not in blocks
    manager.allocate_slots(second, 1, blocks, num_tokens)
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 16


def test_without_a_window_nothing_is_freed_early() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    request = _request(20)
    manager.allocate_slots(request, 20)
    request.num_computed_tokens = 20
    manager.allocate_slots(request, 1)
    assert NULL_BLOCK not in manager.req_to_blocks["a"] and manager.num_free_blocks == 10


@pytest.mark.parametrize("seed", range(8))
def test_random_streams_keep_every_window_block_and_end_with_a_free_pool(seed: int) -> None:
    """Preemption, chunking, prefix hits and parallel-sample forks with a window: the blocks each
    step reads are never freed, references add up, and every block comes back."""
    import random

    from pagedllm.config import SchedulerConfig
    from pagedllm.core.scheduler import Scheduler
    from tests.unit.scheduler_harness import FakeModelRunner

    rng = random.Random(seed)
    block_size, window = rng.choice([(1, 3), (2, 5), (4, 9), (2, 17), (4, 20)])
    max_model_len = 40
    num_blocks = -(-max_model_len // block_size) + rng.randrange(4)
    manager = KVCacheManager(num_blocks, block_size, max_model_len, enable_caching=True, sliding_window=window)
    config = SchedulerConfig(max_num_batched_tokens=rng.choice([3, 8, 40]), max_num_seqs=6,
                             max_model_len=max_model_len)
    scheduler = Scheduler(config, manager)
    runner = FakeModelRunner(block_size, sample=lambda _: rng.randrange(4))
    prompts = [[100 + rng.randrange(3) for _ in range(rng.randrange(1, 30))] for _ in range(4)]
    for i in range(12):
        # Shared prompts (prefix hits); every third request a parallel sample of the one before.
        fork_source = f"r{i - 1}" if i % 3 == 2 else None
        prompt = scheduler.requests[fork_source].prompt_token_ids if fork_source else rng.choice(prompts)
        scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12)),
                                      fork_source_id=fork_source))
    for _ in range(2000):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        for data in [*out.scheduled_new_reqs, *out.scheduled_cached_reqs]:
            table = manager.req_to_blocks[data.req_id]
            first_read = max(0, data.num_computed_tokens - window + 1) // block_size
            assert NULL_BLOCK not in table[first_read:], "a block this step reads was freed"
        references: dict[int, int] = {}
        for table in manager.req_to_blocks.values():
            for block in table:
                if block is not NULL_BLOCK:
                    references[block.block_id] = references.get(block.block_id, 0) + 1
        for block in manager.block_pool.blocks:
            assert block.ref_cnt == references.get(block.block_id, 0)
        assert manager.num_free_blocks == num_blocks - len(references)
        scheduler.update_from_output(out, runner.execute(out))
    assert not scheduler.has_unfinished_requests()
    assert manager.num_free_blocks == num_blocks
