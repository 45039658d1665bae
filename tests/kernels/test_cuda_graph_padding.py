"""The prefill CUDA graphs' padded inputs: what a graph of T tokens and R requests sees.

A step with prefills is copied into static buffers sized for the graph (worker/cuda_graph.py):
padding tokens write to no slot, padding requests own no tokens. These tests stage real steps
through the runner's own code (on CPU, over buffers left dirty by earlier steps) and run the
attention kernels on the staged view under the Triton interpreter: every real token must get
exactly what the unpadded step gives it, padding must write nothing.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagedllm.attention import triton_backend as tb  # noqa: E402
from pagedllm.worker.cuda_graph import CUDAGraphRunner, capture_sizes, prefill_capture_sizes  # noqa: E402
from tests.kernels.test_triton_attention import DEVICE, SCALE, make_batch, max_error, new_token_positions_and_slots  # noqa: E402

MAX_MODEL_LEN = 160
BLOCK_SIZE = 16


def make_runner(max_num_seqs: int = 8, max_prefill_tokens: int = 128) -> CUDAGraphRunner:
    """A runner whose static buffers hold stale values from 'earlier steps' (no graphs captured)."""
    runner = CUDAGraphRunner(torch.nn.Identity(), max_num_seqs, MAX_MODEL_LEN, BLOCK_SIZE, DEVICE,
                             choose_splits=lambda batch, max_len: 1, max_prefill_tokens=max_prefill_tokens)
    gen = torch.Generator().manual_seed(123)
    runner.seq_lens.copy_(torch.randint(1, MAX_MODEL_LEN, runner.seq_lens.shape, generator=gen))
    runner.block_tables.copy_(torch.randint(0, 4, runner.block_tables.shape, generator=gen))
    runner.slot_mapping.copy_(torch.randint(0, 4 * BLOCK_SIZE, runner.slot_mapping.shape, generator=gen))
    runner.positions.copy_(torch.randint(0, MAX_MODEL_LEN, runner.positions.shape, generator=gen))
    runner.prefill_query_start_loc.copy_(torch.arange(runner.prefill_query_start_loc.shape[0], dtype=torch.int32))
    return runner


def test_prefill_capture_sizes_double_up_to_256_then_step_by_128_up_to_the_limit() -> None:
    assert prefill_capture_sizes(0) == []
    assert prefill_capture_sizes(16) == [16]
    assert prefill_capture_sizes(100) == [16, 32, 64, 100]
    assert prefill_capture_sizes(512) == [16, 32, 64, 128, 256, 384, 512]
    assert prefill_capture_sizes(1000) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1000]
    sizes = prefill_capture_sizes(2048)
    assert sizes[-1] == 2048 and len(sizes) == 19
    # Every step of up to 2048 tokens gets a graph with fewer than 128 padding tokens past 256.
    for tokens in range(257, 2049):
        assert 0 <= next(size for size in sizes if size >= tokens) - tokens < 128


def test_decode_capture_sizes_end_at_max_num_seqs() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("max_num_seqs", [1, 2, 8])
def test_prefill_capture_keeps_every_request_within_max_model_len(max_num_seqs: int) -> None:
    """Capturing a prefill graph of more tokens than max_model_len once put them all in one
    request, whose block-table row the attention then read past its end: an illegal address on
    the GPU when the table has one or two rows (--max-num-seqs 1 or 2 with a short
    --max-model-len). Now the tokens are whole prompts of at most max_model_len each, and no
    graph is larger than max_batch such prompts."""
    runner = make_runner(max_num_seqs=max_num_seqs, max_prefill_tokens=512)
    assert runner.prefill_sizes[-1] == min(512, max_num_seqs * MAX_MODEL_LEN)
    kv_cache = torch.randn(2, 4, BLOCK_SIZE, 2, 16, device=DEVICE)
    for tokens in runner.prefill_sizes:
        runner.stage_prefill_capture(tokens)
        md = runner.prefill_metadata(tokens)
        starts = md.query_start_loc.tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        assert starts[0] == 0 and starts[-1] == tokens and min(query_lens) >= 0
        assert max(query_lens) <= MAX_MODEL_LEN
        owners = [i for i, n in enumerate(query_lens) if n]
        assert owners == list(range(len(owners)))  # the requests with tokens come first
        assert md.seq_lens[owners].tolist() == [query_lens[i] for i in owners]  # fresh prompts
        assert not md.block_tables.any() and torch.equal(md.slot_mapping, torch.full((tokens,), -1, device=DEVICE))
    # The largest graph's staged step runs through the attention as captured.
    tokens = runner.prefill_sizes[-1]
    query = torch.randn(tokens, 4, 16, device=DEVICE)
    out = tb.paged_attention(query, kv_cache, runner.prefill_metadata(tokens), SCALE)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("query_lens", "seq_lens", "group"), [
    ([1, 1, 9, 21], [40, 2, 29, 21], 2),  # decodes, a chunk with context, a whole prompt: 32 tokens
    ([13], [13], 2),  # one fresh prompt, padded from 13 to 16 tokens
    ([5, 30], [70, 30], 2),  # 35 tokens: the 64-token graph
    ([1, 100], [30, 130], 2),  # 101 tokens: the 128-token graph
    ([120], [120], 4),  # 4 query tiles of 32 tokens: padding requests must come after them all
])
def test_staged_step_gives_every_real_token_its_unpadded_attention(query_lens: list[int], seq_lens: list[int],
                                                                   group: int) -> None:
    batch = make_batch(query_lens, seq_lens, group=group, seed=sum(query_lens))
    md = batch.metadata
    runner = make_runner()
    n = md.num_actual_tokens
    tokens = runner.stage_prefill(torch.zeros(n, dtype=torch.long, device=DEVICE),
                                  torch.zeros(n, dtype=torch.long, device=DEVICE), md)
    assert tokens == next(size for size in runner.prefill_sizes if size >= n)
    staged = runner.prefill_metadata(tokens)
    assert staged.num_decodes == 0 and staged.num_reqs == min(tokens, runner.max_batch)
    assert torch.equal(runner.slot_mapping[n:tokens], torch.full((tokens - n,), -1, device=DEVICE))

    query = torch.cat([batch.query, torch.randn(tokens - n, *batch.query.shape[1:], device=DEVICE)])
    out = torch.full_like(query, 7.0)
    tb.paged_attention(query, batch.kv_cache, staged, SCALE, out=out)
    # The graph serves decodes through the varlen kernel too: equal to that kernel unpadded.
    unpadded = torch.empty_like(batch.query)
    tb.varlen_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                        0, md.num_reqs, n, SCALE, unpadded)
    assert torch.equal(out[:n], unpadded)
    assert max_error(out, batch) < 1e-5
    assert torch.equal(out[n:], torch.full_like(out[n:], 7.0))  # padding rows: no request owns them


def test_staged_decode_step_gives_every_real_row_its_unpadded_attention() -> None:
    batch = make_batch([1, 1, 1], [40, 2, 29], group=2, seed=3)
    md = batch.metadata
    runner = make_runner()
    n = md.num_reqs
    size = runner.stage_decode(torch.zeros(n, dtype=torch.long, device=DEVICE),
                               torch.zeros(n, dtype=torch.long, device=DEVICE), md)
    assert size == 4  # the ladder 1, 2, 4, 8
    staged = runner.decode_metadata(size)
    assert torch.equal(runner.slot_mapping[n:size], torch.full((size - n,), -1, device=DEVICE))
    assert torch.equal(runner.seq_lens[n:size], torch.ones(size - n, dtype=torch.long, device=DEVICE))
    query = torch.cat([batch.query, torch.randn(size - n, *batch.query.shape[1:], device=DEVICE)])
    out = torch.empty_like(query)
    tb.paged_attention(query, batch.kv_cache, staged, SCALE, out=out, num_kv_splits=2)
    unpadded = tb.paged_attention(batch.query, batch.kv_cache, md, SCALE, num_kv_splits=2)
    assert torch.equal(out[:n], unpadded)


def test_staged_padding_tokens_write_nothing_into_the_cache() -> None:
    batch = make_batch([1, 6], [17, 22], seed=5)
    md = batch.metadata
    num_kv_heads, head_dim = batch.kv_cache.shape[3], batch.kv_cache.shape[4]
    _, slots = new_token_positions_and_slots(md, BLOCK_SIZE)
    md.slot_mapping = torch.tensor(slots, device=DEVICE)
    runner = make_runner()
    n = md.num_actual_tokens
    tokens = runner.stage_prefill(torch.zeros(n, dtype=torch.long, device=DEVICE),
                                  torch.zeros(n, dtype=torch.long, device=DEVICE), md)
    key = torch.randn(tokens, num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(tokens, num_kv_heads, head_dim, device=DEVICE)
    expected = batch.kv_cache.clone()
    tb.reshape_and_cache(key[:n], value[:n], expected, md.slot_mapping)
    tb.reshape_and_cache(key, value, batch.kv_cache, runner.prefill_metadata(tokens).slot_mapping)
    assert torch.equal(batch.kv_cache, expected)


def test_can_run_routes_steps_by_kind_and_size() -> None:
    runner = make_runner(max_num_seqs=8, max_prefill_tokens=64)
    decodes = make_batch([1, 1, 1], [5, 9, 3]).metadata
    small_prefill = make_batch([1, 40], [5, 40]).metadata
    large_prefill = make_batch([70], [70]).metadata  # past the largest prefill graph
    assert runner.can_run(decodes)
    assert runner.can_run(small_prefill)
    assert not runner.can_run(large_prefill)
    too_many_decodes = make_batch([1] * 9, [4] * 9).metadata
    assert not runner.can_run(too_many_decodes)
    assert not make_runner(max_prefill_tokens=0).can_run(small_prefill)


def test_decode_graphs_for_shorter_contexts_serve_the_steps_that_fit_them() -> None:
    runner = CUDAGraphRunner(torch.nn.Identity(), 8, MAX_MODEL_LEN, BLOCK_SIZE, DEVICE,
                             choose_splits=lambda batch, max_len: max_len // 32,
                             context_bounds=lambda batch: [64, 999] if batch <= 2 else [])
    # Bounds at or past max_model_len fold into it; batch sizes without short graphs keep one.
    assert runner.context_bounds == {1: [64, MAX_MODEL_LEN], 2: [64, MAX_MODEL_LEN], 4: [MAX_MODEL_LEN],
                                     8: [MAX_MODEL_LEN]}
    short = runner.decode_metadata(2, 64)
    assert short.max_seq_len == 64 and short.seq_lens_cpu == [64, 64] and short.num_kv_splits == 2
    assert runner.decode_metadata(2).max_seq_len == MAX_MODEL_LEN
    for seq_lens, size, bound in (([40, 64], 2, 64), ([40, 65], 2, MAX_MODEL_LEN), ([3], 1, 64),
                                  ([3, 3, 3], 4, MAX_MODEL_LEN)):
        md = make_batch([1] * len(seq_lens), seq_lens, seed=len(seq_lens)).metadata
        assert runner.stage_decode(torch.zeros(len(seq_lens), dtype=torch.long, device=DEVICE),
                                   torch.zeros(len(seq_lens), dtype=torch.long, device=DEVICE), md) == size
        assert runner.decode_context_bound(size, md) == bound
