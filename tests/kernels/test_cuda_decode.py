"""Specification of the CUDA decode attention (attention/cuda_decode.py): GPU only (sm_90+, nvcc).

Where it serves is checked everywhere; on a Hopper GPU (run with TRITON_INTERPRET=0) its
output is checked against the torch backend in fp32, its folded rotary and K/V write against
the separate kernels, and a CUDA-graph replay against eager runs.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import cuda_decode
from pagedllm.attention.metadata import AttentionMetadata

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
gpu_only = pytest.mark.skipif(not HOPPER, reason="the CUDA decode attention needs an sm_90+ GPU")
SCALE = 0.088


def test_clusters_shrink_as_the_batch_fills_the_gpu() -> None:
    assert cuda_decode.cluster_size(1, 8, 132) == 8
    assert cuda_decode.cluster_size(1, 4, 132) == 8
    assert cuda_decode.cluster_size(4, 8, 132) == 4
    assert cuda_decode.cluster_size(8, 8, 132) == 2
    assert cuda_decode.cluster_size(16, 8, 132) == 1
    assert cuda_decode.cluster_size(1000, 8, 132) == 1


def test_chunks_hold_at_most_32_scores() -> None:
    assert [cuda_decode.chunk_tokens(g) for g in (1, 2, 3, 4, 5, 8)] == [8, 8, 8, 8, 4, 4]


def test_switch_and_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cuda_decode.ENV_VAR, raising=False)
    assert cuda_decode.enabled_by_env()
    for value, expected in (("0", False), ("false", False), ("1", True)):
        monkeypatch.setenv(cuda_decode.ENV_VAR, value)
        assert cuda_decode.enabled_by_env() is expected
    monkeypatch.delenv(cuda_decode.ENV_VAR)
    q = torch.zeros(1, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, 16, 2, 128, dtype=torch.bfloat16)
    assert not cuda_decode.serves(q, cache, q, torch.ones(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
                                  1, 16, None, None, None)


def test_layers_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in Hopper with 132 SMs: the shape rules need no GPU.
    monkeypatch.setattr(cuda_decode, "_device_ok", lambda index: (True, 132))
    monkeypatch.delenv(cuda_decode.ENV_VAR, raising=False)
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16

    def serves(**changes: object) -> bool:
        args = dict(num_heads=32, num_kv_heads=8, head_dim=128, dtype=bf16, page=16, sliding_window=None,
                    logits_soft_cap=None, num_decodes=1, device=gpu)
        args.update(changes)
        return cuda_decode.serves_layer(**args)  # type: ignore[arg-type]

    assert serves() and serves(num_heads=24) and serves(num_heads=8)  # groups of 4, 3 and 1
    assert serves(num_decodes=8) and not serves(num_decodes=9)  # 9 x 8 pairs leave no room for clusters of 2
    for changes in (dict(num_heads=72), dict(num_heads=20), dict(head_dim=64), dict(dtype=torch.float16),
                    dict(page=4), dict(sliding_window=4096), dict(logits_soft_cap=30.0), dict(num_decodes=0),
                    dict(device=torch.device("cpu"))):
        assert not serves(**changes), changes  # group 9, uneven group, head dim, dtype, page, window, cap, ...
    monkeypatch.setenv(cuda_decode.ENV_VAR, "0")
    assert not serves()
    monkeypatch.setattr(cuda_decode, "_device_ok", lambda index: (False, 132))  # before sm_90: no clusters
    monkeypatch.delenv(cuda_decode.ENV_VAR)
    assert not serves()


# ---------------------------------------------------------------- GPU


def _batch(seq_lens: list[int], num_kv_heads: int, group: int, block_size: int = 16,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Decodes only: a bf16 query per request, a filled pool with shuffled blocks, the metadata."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [max(1, -(-s // block_size)) for s in seq_lens]
    num_blocks = sum(blocks) + 3
    pool = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(blocks) + 2, dtype=torch.int64)  # wider than needed
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = pool[used: used + n]
        used += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, 128, generator=gen).to(torch.bfloat16).cuda()
    query = torch.randn(len(seq_lens), num_kv_heads * group, 128, generator=gen).to(torch.bfloat16).cuda()
    n = len(seq_lens)
    md = AttentionMetadata(
        num_actual_tokens=n, num_decodes=n,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device="cuda"),
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device="cuda"),
        block_tables=tables.cuda(), max_query_len=1, max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=list(seq_lens),
    )
    return query, cache, md


def _reference(query: torch.Tensor, cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
    from pagedllm.attention import torch_backend

    return torch_backend.paged_attention(query.float(), cache.float(), md, SCALE)


def _check_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    err = (out.float() - expected.float()).abs().max().item()
    assert err < 2e-2, err


@gpu_only
@pytest.mark.parametrize(("group", "num_kv_heads"), [(1, 8), (2, 4), (3, 2), (4, 8), (4, 4), (8, 1)])
@pytest.mark.parametrize("seq_lens", [[1], [7, 8, 9], [300], [1000, 17], [2500]])
def test_decodes_match_the_torch_backend(group: int, num_kv_heads: int, seq_lens: list[int]) -> None:
    query, cache, md = _batch(seq_lens, num_kv_heads, group, seed=group * 7 + len(seq_lens))
    out = torch.full_like(query, float("nan"))
    # Longer contexts are the Triton kernel's in the engine; the kernel itself serves any length.
    assert cuda_decode.serves(query, cache, out, md.seq_lens, md.block_tables, md.num_decodes, md.max_seq_len,
                              None, None, None) == (md.max_seq_len <= cuda_decode.MAX_CONTEXT)
    cuda_decode.decode_attention(query, cache, md.seq_lens, md.block_tables, md.num_decodes, SCALE, out)
    _check_close(out, _reference(query, cache, md))


@gpu_only
def test_clusters_of_16_ctas_match_the_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_decode, "MAX_CLUSTER", 16)
    assert cuda_decode.cluster_size(1, 4, 132) == 16
    query, cache, md = _batch([3000], 4, 4, seed=9)
    out = torch.full_like(query, float("nan"))
    cuda_decode.decode_attention(query, cache, md.seq_lens, md.block_tables, 1, SCALE, out)
    _check_close(out, _reference(query, cache, md))


@gpu_only
def test_a_request_with_no_keys_yields_zeros() -> None:
    query, cache, md = _batch([5, 1], 4, 4)
    md.seq_lens[1] = 0
    out = torch.full_like(query, float("nan"))
    cuda_decode.decode_attention(query, cache, md.seq_lens, md.block_tables, 2, SCALE, out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    first = AttentionMetadata(
        num_actual_tokens=1, num_decodes=1, query_start_loc=md.query_start_loc[:2], seq_lens=md.seq_lens[:1],
        slot_mapping=md.slot_mapping[:1], block_tables=md.block_tables[:1], max_query_len=1, max_seq_len=5,
        query_start_loc_cpu=[0, 1], seq_lens_cpu=[5])
    _check_close(out[:1], _reference(query[:1], cache, first))


@gpu_only
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("pdl", [0, 1, 2])
def test_folded_rotary_and_kv_write_equal_the_separate_kernels(rope: bool, pdl: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.attention import triton_backend as tb
    from pagedllm.layers import triton_fused
    from pagedllm.layers.rotary import RotaryEmbedding

    num_kv_heads, group, n = 4, 4, 4
    # The last request is a graph-padding row: seq_len 1 and slot -1 (writes nothing).
    query, cache, md = _batch([17, 300, 64, 1], num_kv_heads, group, seed=11)
    slots = [int(md.block_tables[i, (s - 1) // 16]) * 16 + (s - 1) % 16 for i, s in enumerate(md.seq_lens_cpu)]
    slots[3] = -1
    md.slot_mapping = torch.tensor(slots, dtype=torch.int64, device="cuda")
    positions = md.seq_lens - 1
    rotary = RotaryEmbedding(128, 128, 4096, {"rope_theta": 500000.0, "rope_type": "default"}).cuda()
    q_size, kv_size = num_kv_heads * group * 128, num_kv_heads * 128
    qkv = torch.randn(n, q_size + 2 * kv_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).cuda()
    qkv_before = qkv.clone()

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = t.split([q_size, kv_size, kv_size], dim=-1)
        return q.view(n, -1, 128), k.view(n, num_kv_heads, 128), v.view(n, num_kv_heads, 128)

    expected_cache = cache.clone()
    q, k, v = views(qkv.clone())
    if rope:
        triton_fused.rotary_embedding_(positions, q, k, rotary.cos_cache, rotary.sin_cache, 128)
    tb.reshape_and_cache(k, v, expected_cache, md.slot_mapping)
    expected = _reference(q, expected_cache, md)

    q, k, v = views(qkv)
    new_tokens = (tb.NewTokens(k, v, md.slot_mapping, positions, rotary.cos_cache, rotary.sin_cache) if rope
                  else tb.NewTokens(k, v, md.slot_mapping))
    out = torch.full_like(q, float("nan"))
    monkeypatch.setenv(tb.ATTENTION_PDL_ENV, str(pdl))
    # Through the backend's dispatch, as the Attention layer calls it.
    tb.paged_attention(q, cache, md, SCALE, out, new_tokens=new_tokens)
    assert torch.equal(qkv, qkv_before)  # the query is rotated in registers, its buffer untouched
    assert (cache.float() - expected_cache.float()).abs().max().item() <= 2e-2 * expected_cache.float().abs().max()
    _check_close(out[:3], expected[:3])
    assert torch.isfinite(out[3].float()).all()


@gpu_only
def test_graph_replay_follows_new_lengths() -> None:
    query, cache, md = _batch([40, 200], 8, 4, seed=5)
    md.block_tables = torch.cat([md.block_tables, torch.zeros(2, 20, dtype=torch.int64, device="cuda")], dim=1)
    out = torch.zeros_like(query)

    def run() -> None:
        cuda_decode.decode_attention(query, cache, md.seq_lens, md.block_tables, 2, SCALE, out)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens in ([41, 201], [3, 250], [160, 16]):
        md.seq_lens.copy_(torch.tensor(lens))
        md.seq_lens_cpu, md.max_seq_len = lens, max(lens)
        md.backend_cache.clear()  # the torch backend's gather plan is per step
        graph.replay()
        torch.cuda.synchronize()
        _check_close(out, _reference(query, cache, md))
