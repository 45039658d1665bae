"""Specification of the Triton KV-cache and attention kernels, checked against the torch backend.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small; block
tiles are shrunk where a test needs several query or KV tiles per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from pagedllm.attention import torch_backend  # noqa: E402
from pagedllm.attention import triton_backend as tb  # noqa: E402
from pagedllm.attention.metadata import AttentionMetadata  # noqa: E402

from tests.kernels.kernel_device import DEVICE, skip_module_unless_kernels_run  # noqa: E402

skip_module_unless_kernels_run()

SCALE = 0.125


@pytest.fixture(autouse=True)
def _triton_decode_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU these tests are the Triton kernels' even where the CUDA decode kernel would serve
    (tests/kernels/test_cuda_decode.py checks that one)."""
    from pagedllm.attention import cuda_decode

    monkeypatch.setenv(cuda_decode.ENV_VAR, "0")


@dataclass
class Batch:
    """A random paged batch: queries, a filled KV pool with shuffled blocks, and its metadata."""

    query: torch.Tensor
    kv_cache: torch.Tensor
    metadata: AttentionMetadata


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    num_kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Batch:
    """Requests ordered decodes first; request i has seq_lens[i] tokens, the last query_lens[i] new."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 5  # spare blocks: tables must not depend on a tight pool
    pool = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int64)
    used = 0
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = pool[used : used + n]
        used += n
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    num_tokens = qsl[-1]
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_decodes=sum(1 for q in query_lens if q == 1),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=DEVICE),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
    )
    return Batch(query.to(DEVICE), kv_cache.to(DEVICE), metadata)


def reference(batch: Batch, **window_args: Any) -> torch.Tensor:
    """The torch backend's answer, computed in fp32 (window_args: sliding_window, logits_soft_cap)."""
    out = torch_backend.paged_attention(batch.query.float(), batch.kv_cache.float(), batch.metadata, SCALE,
                                        **window_args)
    return out[: batch.metadata.num_actual_tokens]


def max_error(out: torch.Tensor, batch: Batch, **window_args: Any) -> float:
    n = batch.metadata.num_actual_tokens
    return (out[:n].float() - reference(batch, **window_args)).abs().max().item()


def new_token_positions_and_slots(md: AttentionMetadata, block_size: int) -> tuple[list[int], list[int]]:
    """Each new token's position and cache slot: the last query_len positions of every request."""
    positions, slots = [], []
    for i in range(md.num_reqs):
        q_len = md.query_start_loc_cpu[i + 1] - md.query_start_loc_cpu[i]
        for pos in range(md.seq_lens_cpu[i] - q_len, md.seq_lens_cpu[i]):
            positions.append(pos)
            slots.append(int(md.block_tables[i, pos // block_size]) * block_size + pos % block_size)
    return positions, slots


# ---------------------------------------------------------------- reshape_and_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_writes_each_token_to_its_slot_and_skips_padding(dtype: torch.dtype) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = 6, 8, 3, 32
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:9]
    slots[[2, 7]] = -1
    key = torch.randn(10, num_kv_heads, head_dim, generator=gen).to(dtype)  # one row past the slots
    value = torch.randn(10, num_kv_heads, head_dim, generator=gen).to(dtype)
    expected = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    actual = expected.clone().to(DEVICE)
    torch_backend.write_to_kv_cache(key, value, expected, slots)
    tb.reshape_and_cache(key.to(DEVICE), value.to(DEVICE), actual, slots.to(DEVICE))
    assert torch.equal(actual.cpu(), expected)


def test_reshape_and_cache_reads_strided_views_of_a_fused_qkv_output() -> None:
    num_kv_heads, head_dim, num_tokens = 2, 16, 5
    qkv = torch.randn(num_tokens, 4 * num_kv_heads * head_dim, device=DEVICE)
    key = qkv[:, 2 * num_kv_heads * head_dim : 3 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 3 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([3, 17, 0, 9, 30], device=DEVICE)
    cache = torch.zeros(2, 4, 8, num_kv_heads, head_dim, device=DEVICE)
    tb.reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache[0].view(-1, num_kv_heads, head_dim)[slots], key)
    assert torch.equal(cache[1].view(-1, num_kv_heads, head_dim)[slots], value)


# ---------------------------------------------------------------- decodes (split-KV)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_batch_matches_torch(group: int, head_dim: int, num_kv_splits: int) -> None:
    batch = make_batch([1, 1, 1], [37, 1, 70], group=group, head_dim=head_dim, seed=group)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=num_kv_splits)
    assert max_error(out, batch) < 1e-5


def test_decode_split_count_beyond_the_context_leaves_empty_partitions_harmless() -> None:
    # 16-token tiles, 8 splits of a 20-token context: six partitions see no keys at all.
    batch = make_batch([1, 1], [20, 3], seed=3)
    out = torch.empty_like(batch.query)
    md = batch.metadata
    tb.decode_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                        2, SCALE, out, num_kv_splits=8, block_n=16)
    assert max_error(out, batch) < 1e-5


@pytest.mark.parametrize("pdl", ["0", "1", "2"])
def test_decode_with_each_programmatic_launch_mode_matches_torch(pdl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Split and unsplit: the split reduce or the decode kernel triggers its successor (1), and
    # both are launched with PDL, waiting for their predecessor first (2). Under the interpreter
    # and before sm_90 every mode resolves to 0.
    monkeypatch.setenv(tb.ATTENTION_PDL_ENV, pdl)
    batch = make_batch([1, 1, 1], [37, 1, 300], group=4, seed=21)
    for splits in (1, 8):
        out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=splits)
        assert max_error(out, batch) < 1e-5


@pytest.mark.parametrize("partition_tokens", [16, 32])
def test_decode_partitions_shorter_than_the_tile_match_torch(partition_tokens: int) -> None:
    # 64-token tiles, partitions of 16 or 32 tokens: partitions that start inside a tile, end
    # inside one, and span one whole (the 150-token context over 4 splits: 48 -> 64 or 38 -> 48).
    batch = make_batch([1, 1, 1], [37, 1, 150], group=4, seed=22)
    md = batch.metadata
    for splits in (2, 4, 8):
        out = torch.empty_like(batch.query)
        tb.decode_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                            3, SCALE, out, num_kv_splits=splits, block_n=64, partition_tokens=partition_tokens)
        assert max_error(out, batch) < 1e-5, splits


def test_programmatic_launch_is_off_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tb.ATTENTION_PDL_ENV, "2")
    assert tb.attention_pdl(torch.device("cpu")) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.attention_pdl(torch.device("cuda", 0)) == 0  # the interpreter has no griddepcontrol


def test_programmatic_launch_defaults_to_2_for_triton_on_one_gpu_else_1(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pagedllm.distributed as parallel_state

    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(tb.ATTENTION_PDL_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(tb, "_capability_major", lambda index: 9)  # as on a Hopper GPU
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 1)
    assert tb.attention_pdl(cuda) == 2
    assert tb.attention_pdl(cuda, cuda_kernel=True) == 1  # the CUDA decode kernel serves the step
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 2)
    assert tb.attention_pdl(cuda) == 1
    assert tb.attention_pdl(cuda, cuda_kernel=True) == 1
    monkeypatch.setenv(tb.ATTENTION_PDL_ENV, "2")
    assert tb.attention_pdl(cuda, cuda_kernel=True) == 2  # the switch overrides the default
    monkeypatch.setenv(tb.ATTENTION_PDL_ENV, "0")
    assert tb.attention_pdl(cuda) == 0
    monkeypatch.setenv(tb.ATTENTION_PDL_ENV, "2")
    monkeypatch.setattr(tb, "_capability_major", lambda index: 8)  # before Hopper: no PDL
    assert tb.attention_pdl(cuda) == 0


def test_padded_decode_requests_with_empty_context_yield_zeros_not_nan() -> None:
    # CUDA-graph padding: dummy decode requests with seq_len 0 must not poison the batch.
    batch = make_batch([1, 1, 1], [25, 9, 1], seed=4)
    batch.metadata.seq_lens[2] = 0
    for splits in (1, 4):
        out = torch.full_like(batch.query, float("nan"))
        out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, out=out, num_kv_splits=splits)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        batch.metadata.seq_lens[2] = 1
        expected = reference(batch)
        batch.metadata.seq_lens[2] = 0
        assert (out[:2] - expected[:2]).abs().max().item() < 1e-5


# ---------------------------------------------------------------- prefill and mixed batches


@pytest.mark.parametrize("group", [1, 2, 4])
def test_mixed_batch_of_decodes_chunked_prefills_and_fresh_prompts_matches_torch(group: int) -> None:
    # Decodes, a chunk with cached context, a whole prompt, a chunk ending a block boundary.
    batch = make_batch([1, 1, 9, 21, 16], [40, 2, 29, 21, 48], group=group, seed=10 + group)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE)
    assert max_error(out, batch) < 1e-5


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16), (16, 32)])
def test_prefill_spanning_several_query_and_kv_tiles_matches_torch(block_m: int, block_n: int) -> None:
    batch = make_batch([1, 19, 37, 5], [23, 50, 37, 6], group=2, seed=20)
    md = batch.metadata
    out = tb.paged_attention(batch.query, batch.kv_cache, md, SCALE, num_kv_splits=2)
    # Re-run the prefill part with small tiles: many tiles per request, causal and context phases.
    tb.varlen_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                        md.num_decodes, md.num_reqs, md.num_actual_tokens - md.num_decodes, SCALE, out,
                        block_m=block_m, block_n=block_n)
    assert max_error(out, batch) < 1e-5


@pytest.mark.parametrize("context_len", [14, 15, 16, 17])
def test_chunk_starting_next_to_a_kv_tile_boundary_sees_exactly_its_causal_keys(context_len: int) -> None:
    # Tiles wholly before the first query skip the causal mask; the tile holding it must not.
    batch = make_batch([6], [context_len + 6], seed=context_len)
    md = batch.metadata
    out = torch.empty_like(batch.query)
    tb.varlen_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                        0, 1, 6, SCALE, out, block_m=16, block_n=16)
    assert max_error(out, batch) < 1e-5


def test_varlen_kernel_alone_serves_decodes_too() -> None:
    batch = make_batch([1, 1, 7], [33, 17, 12], group=4, seed=30)
    md = batch.metadata
    out = torch.empty_like(batch.query)
    tb.varlen_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                        0, md.num_reqs, md.num_actual_tokens, SCALE, out, block_m=16, block_n=16)
    assert max_error(out, batch) < 1e-5


def test_group_of_three_query_heads_per_kv_head_matches_torch() -> None:
    # SmolLM2-135M: 9 query heads over 3 KV heads; tiles hold 5 tokens x 3 heads (+1 idle row).
    batch = make_batch([1, 11], [26, 30], num_kv_heads=3, group=3, seed=40)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=2)
    assert max_error(out, batch) < 1e-5


def test_head_dim_256_matches_torch() -> None:
    batch = make_batch([1, 6], [30, 20], num_kv_heads=1, head_dim=256, seed=50)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=2)
    assert max_error(out, batch) < 1e-5


def test_head_dim_that_is_not_a_power_of_two_matches_torch() -> None:
    batch = make_batch([1, 5], [19, 22], head_dim=48, seed=55)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=2)
    assert max_error(out, batch) < 1e-5


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_power_of_two_block_sizes_match_torch(block_size: int) -> None:
    batch = make_batch([1, 1, 13], [45, 8, 40], block_size=block_size, seed=60 + block_size)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=2)
    assert max_error(out, batch) < 1e-5


def test_rows_past_the_last_request_are_left_untouched() -> None:
    # CUDA-graph style padding: the query tensor is larger than the scheduled tokens.
    batch = make_batch([1, 4], [10, 12], seed=70)
    padded = torch.cat([batch.query, torch.zeros(3, *batch.query.shape[1:], device=DEVICE)])
    out = torch.full_like(padded, 7.0)
    tb.paged_attention(padded, batch.kv_cache, batch.metadata, SCALE, out=out)
    assert torch.equal(out[5:], torch.full_like(out[5:], 7.0))
    assert max_error(out, batch) < 1e-5


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_fp32_reference(dtype: torch.dtype) -> None:
    batch = make_batch([1, 1, 9, 14], [50, 6, 30, 14], group=2, dtype=dtype, seed=80)
    for splits in (1, 4):
        out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=splits)
        assert out.dtype == dtype
        assert max_error(out, batch) < 2e-2


# ---------------------------------------------------------------- end to end with cache writes


def test_write_then_attend_equals_the_torch_backend_doing_both() -> None:
    batch = make_batch([1, 1, 6], [17, 30, 22], seed=90)
    md = batch.metadata
    num_kv_heads, head_dim = batch.kv_cache.shape[3], batch.kv_cache.shape[4]
    block_size = batch.kv_cache.shape[2]
    # New tokens are the last query_len positions of each request; one padding row is appended.
    _, slots = new_token_positions_and_slots(md, block_size)
    slot_mapping = torch.tensor(slots + [-1], device=DEVICE)
    key = torch.randn(len(slots) + 1, num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(len(slots) + 1, num_kv_heads, head_dim, device=DEVICE)
    expected_cache = batch.kv_cache.clone()
    torch_backend.write_to_kv_cache(key, value, expected_cache, slot_mapping)
    expected = torch_backend.paged_attention(batch.query, expected_cache, md, SCALE)
    tb.reshape_and_cache(key, value, batch.kv_cache, slot_mapping)
    out = tb.paged_attention(batch.query, batch.kv_cache, md, SCALE)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert (out - expected).abs().max().item() < 1e-5


# ---------------------------------------------------------------- steps folded into the decode kernel


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise under the interpreter; on a GPU the compiler may contract the rotary's multiply-adds
    differently in the two kernels (one fp32 rounding), so there: within the dtype's rounding."""
    if DEVICE.type == "cpu":
        assert torch.equal(actual, expected)
    else:
        tol = 1e-5 if actual.dtype == torch.float32 else 2e-2
        diff = (actual.float() - expected.float()).abs().max().item()
        assert diff <= tol * max(1.0, expected.float().abs().max().item()), diff


def _new_token_slots(md: AttentionMetadata, block_size: int) -> torch.Tensor:
    """Each decode's slot for its newest position (seq_len - 1)."""
    return torch.tensor(new_token_positions_and_slots(md, block_size)[1], device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "num_kv_splits", "window", "head_dim", "soft_cap"),
                         [(1, 1, None, 64, None), (4, 4, None, 64, None), (2, 3, 20, 64, None),
                          (2, 2, 9, 256, 30.0)])  # the last: Gemma 2's head dim, window and soft cap
@pytest.mark.parametrize("partition_tokens", [None, 16])
def test_decode_kernel_rotating_and_writing_new_tokens_equals_the_separate_kernels(
    dtype: torch.dtype, group: int, num_kv_splits: int, window: int | None, head_dim: int, soft_cap: float | None,
    partition_tokens: int | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pagedllm.layers import triton_fused
    from pagedllm.layers.rotary import RotaryEmbedding

    # 16-token partitions: the program that writes the newest key may start inside a tile.
    monkeypatch.setattr(tb, "DECODE_PARTITION_TOKENS", partition_tokens)

    # A graph-padding row last: seq_len 1 and slot -1 (writes nothing, attends over block 0).
    batch = make_batch([1, 1, 1, 1], [17, 1, 70, 1], group=group, head_dim=head_dim, dtype=dtype, seed=140 + group)
    md = batch.metadata
    num_kv_heads = batch.kv_cache.shape[3]
    slots = _new_token_slots(md, batch.kv_cache.shape[2])
    slots[3] = -1
    md.slot_mapping = slots
    positions = md.seq_lens - 1
    rotary = RotaryEmbedding(head_dim, head_dim, 128, {"rope_theta": 10000.0, "rope_type": "default"}).to(DEVICE)
    # q, k, v as strided views of one fused QKV output, as the model hands them over.
    q_size, kv_size = num_kv_heads * group * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(4, q_size + 2 * kv_size, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    qkv_before = qkv.clone()

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = t.split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(4, num_kv_heads * group, head_dim), k.view(4, num_kv_heads, head_dim),
                v.view(4, num_kv_heads, head_dim))

    expected_cache = batch.kv_cache.clone()
    q, k, v = views(qkv.clone())
    triton_fused.rotary_embedding_(positions, q, k, rotary.cos_cache, rotary.sin_cache, head_dim)
    tb.reshape_and_cache(k, v, expected_cache, slots)
    expected = tb.paged_attention(q, expected_cache, md, SCALE, num_kv_splits=num_kv_splits, sliding_window=window,
                                  logits_soft_cap=soft_cap)

    q, k, v = views(qkv)
    new_tokens = tb.NewTokens(k, v, slots, positions, rotary.cos_cache, rotary.sin_cache)
    out = tb.paged_attention(q, batch.kv_cache, md, SCALE, num_kv_splits=num_kv_splits, sliding_window=window,
                             logits_soft_cap=soft_cap, new_tokens=new_tokens)
    assert_same(batch.kv_cache, expected_cache)
    assert_same(out, expected)
    assert torch.equal(qkv, qkv_before)  # the query is rotated in registers, its buffer untouched


def test_decode_kernel_writing_new_tokens_without_rotary_equals_reshape_and_cache() -> None:
    batch = make_batch([1, 1, 1], [33, 5, 16], group=2, seed=150)
    md = batch.metadata
    num_kv_heads, head_dim = batch.kv_cache.shape[3], batch.kv_cache.shape[4]
    md.slot_mapping = _new_token_slots(md, batch.kv_cache.shape[2])
    key = torch.randn(3, num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(3, num_kv_heads, head_dim, device=DEVICE)
    expected_cache = batch.kv_cache.clone()
    tb.reshape_and_cache(key, value, expected_cache, md.slot_mapping)
    expected = tb.paged_attention(batch.query, expected_cache, md, SCALE, num_kv_splits=2)
    out = tb.paged_attention(batch.query, batch.kv_cache, md, SCALE, num_kv_splits=2,
                             new_tokens=tb.NewTokens(key, value, md.slot_mapping))
    assert torch.equal(batch.kv_cache, expected_cache)
    assert torch.equal(out, expected)


def test_mixed_batch_with_decodes_folded_and_prefills_written_from_an_offset_equals_the_separate_kernels() -> None:
    from pagedllm.layers import triton_fused
    from pagedllm.layers.rotary import RotaryEmbedding

    batch = make_batch([1, 1, 6, 9], [17, 30, 22, 9], group=2, seed=160)
    md = batch.metadata
    block_size, num_kv_heads, head_dim = batch.kv_cache.shape[2], batch.kv_cache.shape[3], batch.kv_cache.shape[4]
    positions, slots = new_token_positions_and_slots(md, block_size)
    md.slot_mapping = torch.tensor(slots, device=DEVICE)
    positions_t = torch.tensor(positions, device=DEVICE)
    rotary = RotaryEmbedding(head_dim, head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"}).to(DEVICE)
    gen = torch.Generator().manual_seed(8)
    key = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(DEVICE)
    value = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(DEVICE)
    query = batch.query

    expected_cache = batch.kv_cache.clone()
    q, k = query.clone(), key.clone()
    triton_fused.rotary_embedding_(positions_t, q, k, rotary.cos_cache, rotary.sin_cache, head_dim)
    tb.reshape_and_cache(k, value, expected_cache, md.slot_mapping)
    expected = tb.paged_attention(q, expected_cache, md, SCALE, num_kv_splits=2)

    q, k = query.clone(), key.clone()
    triton_fused.rotary_embedding_(positions_t, q, k, rotary.cos_cache, rotary.sin_cache, head_dim, first_token=2)
    tb.reshape_and_cache(k, value, batch.kv_cache, md.slot_mapping, first_token=2)
    assert torch.equal(q[:2], query[:2]) and torch.equal(k[:2], key[:2])  # the decodes are left to the kernel
    out = tb.paged_attention(q, batch.kv_cache, md, SCALE, num_kv_splits=2,
                             new_tokens=tb.NewTokens(k, value, md.slot_mapping, positions_t, rotary.cos_cache,
                                                     rotary.sin_cache))
    assert_same(batch.kv_cache, expected_cache)
    assert_same(out, expected)


def test_rotary_is_never_folded_into_attention_on_the_cpu_or_when_partial() -> None:
    from pagedllm.layers.rotary import RotaryEmbedding

    params = {"rope_theta": 10000.0, "rope_type": "default"}
    assert not RotaryEmbedding(64, 64, 32, params).foldable_into_attention(torch.zeros(1, dtype=torch.long))
    partial = RotaryEmbedding(64, 32, 32, params)
    partial.use_fused_path = lambda x: True  # as on CUDA
    assert not partial.foldable_into_attention(torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------- sliding window and soft cap


def poison_blocks_behind_windows(batch: Batch, window: int) -> None:
    """NaN into every block the KV cache manager would have freed: one read would poison the output."""
    md, block_size = batch.metadata, batch.kv_cache.shape[2]
    for i in range(md.num_reqs):
        context_len = md.seq_lens_cpu[i] - (md.query_start_loc_cpu[i + 1] - md.query_start_loc_cpu[i])
        for b in range(max(0, context_len - window + 1) // block_size):
            batch.kv_cache[:, int(md.block_tables[i, b])] = float("nan")


@pytest.mark.parametrize("window", [1, 5, 16, 23, 200])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_sliding_window_mixed_batch_matches_torch(window: int, num_kv_splits: int) -> None:
    # Decodes, chunks with cached context longer than the window, a fresh prompt, odd lengths.
    batch = make_batch([1, 1, 1, 13, 29, 7], [57, 9, 40, 61, 29, 50], group=2, seed=100 + window)
    poison_blocks_behind_windows(batch, window)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=num_kv_splits,
                             sliding_window=window)
    assert max_error(out, batch, sliding_window=window) < 1e-5


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16)])
@pytest.mark.parametrize("window", [3, 17, 20])
def test_sliding_window_prefill_across_many_tiles_matches_torch(block_m: int, block_n: int, window: int) -> None:
    # Small tiles: window tiles, unmasked tiles and causal tiles all occur within one request.
    batch = make_batch([37, 19, 45], [80, 19, 53], group=2, seed=110 + window)
    poison_blocks_behind_windows(batch, window)
    md = batch.metadata
    out = torch.empty_like(batch.query)
    tb.varlen_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                        0, md.num_reqs, md.num_actual_tokens, SCALE, out, sliding_window=window,
                        block_m=block_m, block_n=block_n)
    assert max_error(out, batch, sliding_window=window) < 1e-5


@pytest.mark.parametrize("window", [4, 16, 33])
def test_sliding_window_split_decode_with_small_tiles_matches_torch(window: int) -> None:
    batch = make_batch([1, 1, 1, 1], [100, 31, 16, 3], group=4, seed=120 + window)
    poison_blocks_behind_windows(batch, window)
    out = torch.empty_like(batch.query)
    md = batch.metadata
    for splits in (1, 2, 8):
        tb.decode_attention(batch.query, batch.kv_cache, md.query_start_loc, md.seq_lens, md.block_tables,
                            md.num_decodes, SCALE, out, num_kv_splits=splits, sliding_window=window, block_n=16)
        assert max_error(out, batch, sliding_window=window) < 1e-5


@pytest.mark.parametrize("window", [None, 9])
def test_logit_soft_cap_matches_torch(window: int | None) -> None:
    batch = make_batch([1, 1, 11, 6], [45, 7, 30, 6], group=2, seed=130)
    batch.query.mul_(8.0)  # large scores, so the cap (tanh) bends them visibly
    for splits in (1, 2):
        out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=splits,
                                 sliding_window=window, logits_soft_cap=2.5)
        assert max_error(out, batch, sliding_window=window, logits_soft_cap=2.5) < 1e-5
    uncapped = reference(batch, sliding_window=window)
    assert (uncapped - reference(batch, sliding_window=window, logits_soft_cap=2.5)).abs().max().item() > 1e-2


def test_half_precision_sliding_window_matches_fp32_reference() -> None:
    batch = make_batch([1, 1, 9, 14], [50, 6, 30, 14], group=2, dtype=torch.bfloat16, seed=140)
    out = tb.paged_attention(batch.query, batch.kv_cache, batch.metadata, SCALE, num_kv_splits=2,
                             sliding_window=11, logits_soft_cap=30.0)
    assert max_error(out, batch, sliding_window=11, logits_soft_cap=30.0) < 2e-2


# ---------------------------------------------------------------- split heuristic


def test_split_heuristic_splits_few_long_sequences_and_leaves_large_batches_alone() -> None:
    assert tb.choose_num_kv_splits(1, 8, 32768, sm_count=132) > 8
    assert tb.choose_num_kv_splits(256, 8, 1024, sm_count=132) == 1
    assert tb.choose_num_kv_splits(1, 8, 100, sm_count=132) == 1  # too short to be worth it


def test_split_heuristic_returns_a_power_of_two_within_bounds() -> None:
    for num_seqs in (1, 3, 16, 64):
        for seq_len in (1, 300, 5000, 100000):
            splits = tb.choose_num_kv_splits(num_seqs, 8, seq_len, sm_count=132)
            assert 1 <= splits <= tb.MAX_KV_SPLITS
            assert splits & (splits - 1) == 0


def test_mismatched_head_counts_are_rejected_with_a_clear_message() -> None:
    batch = make_batch([1], [5], num_kv_heads=2, group=2)
    bad_query = batch.query[:, :3]
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tb.paged_attention(bad_query, batch.kv_cache, batch.metadata, SCALE)
