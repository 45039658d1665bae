"""Specification of the decode attention + O projection kernel (attention/cuda_decode_o.py).

Its shape rules are checked everywhere; on a Hopper GPU (TRITON_INTERPRET=0) its output is
checked against the two kernels it replaces (cuda_decode, then the CUDA GEMV) and against fp32,
its K/V write against theirs, and its rows pushed into an all-reduce site against its plain
output.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import cuda_decode_o
from tests.kernels.test_cuda_decode import SCALE, _batch, _reference, gpu_only


def test_splits_fill_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cuda_decode_o.CLUSTER_ENV_VAR, raising=False)
    assert [cuda_decode_o.splits_per_head(h) for h in (1, 2, 4, 8, 16, 32)] == [8, 8, 4, 2, 1, 0]
    monkeypatch.setenv(cuda_decode_o.CLUSTER_ENV_VAR, "8")
    assert [cuda_decode_o.splits_per_head(h) for h in (1, 4, 8, 16)] == [8, 2, 1, 0]


def test_plans_fit_the_shared_memory() -> None:
    # Llama-3.1-8B's O projection at TP=2 and TP=1: 32 KB stages, a 192 KB ring.
    assert cuda_decode_o.plan(4096, 2048, 4) == (8, 6)
    assert cuda_decode_o.plan(4096, 4096, 4) == (4, 6)
    rows, slots = cuda_decode_o.plan(4096, 4096, 8)  # a larger group leaves less room
    assert rows * 8192 * slots + cuda_decode_o._static_smem(8) + 1024 + 8192 <= 227 * 1024


def test_off_by_default_and_not_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 8, 128, dtype=torch.bfloat16)
    w = torch.zeros(64, 8 * 128, dtype=torch.bfloat16)
    monkeypatch.delenv(cuda_decode_o.ENV_VAR, raising=False)
    assert not cuda_decode_o.enabled_by_env()
    monkeypatch.setenv(cuda_decode_o.ENV_VAR, "1")
    assert cuda_decode_o.enabled_by_env()
    assert not cuda_decode_o.serves(q, w, None, 1, 2)  # CPU tensors


# ---------------------------------------------------------------- GPU


def _decode_inputs(seq_len: int, num_kv_heads: int, group: int, seed: int):
    """One decode token: its qkv row (views), a filled cache, metadata with the token's slot, rotary."""
    from pagedllm.layers.rotary import RotaryEmbedding

    _, cache, md = _batch([seq_len], num_kv_heads, group, seed=seed)
    slot = int(md.block_tables[0, (seq_len - 1) // 16]) * 16 + (seq_len - 1) % 16
    md.slot_mapping = torch.tensor([slot], dtype=torch.int64, device="cuda")
    q_size, kv_size = num_kv_heads * group * 128, num_kv_heads * 128
    qkv = torch.randn(1, q_size + 2 * kv_size, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).cuda()
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    rotary = RotaryEmbedding(128, 128, 4096, {"rope_theta": 500000.0, "rope_type": "default"}).cuda()
    return q.view(1, -1, 128), k.view(1, num_kv_heads, 128), v.view(1, num_kv_heads, 128), cache, md, rotary


@gpu_only
@pytest.mark.parametrize(("group", "num_kv_heads", "n"), [(4, 4, 4096), (4, 8, 4096), (1, 8, 512), (8, 2, 1024)])
@pytest.mark.parametrize("seq_len", [1, 17, 384, 700])
def test_equals_the_separate_kernels(group: int, num_kv_heads: int, n: int, seq_len: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.attention import cuda_decode
    from pagedllm.attention import triton_backend as tb
    from pagedllm.layers import cuda_gemv, triton_fused

    monkeypatch.setenv(cuda_decode_o.ENV_VAR, "1")
    q, k, v, cache, md, rotary = _decode_inputs(seq_len, num_kv_heads, group, seed=seq_len + group)
    heads = q.shape[1]
    weight = (torch.randn(n, heads * 128, generator=torch.Generator().manual_seed(1)) / heads ** 0.5).to(
        torch.bfloat16).cuda()
    positions = md.seq_lens - 1
    new_tokens = tb.NewTokens(k, v, md.slot_mapping, positions, rotary.cos_cache, rotary.sin_cache)
    assert cuda_decode_o.serves(q, weight, None, 1, num_kv_heads)

    # The two kernels it replaces.
    cache_two = cache.clone()
    attn = torch.empty_like(q)
    cuda_decode.decode_attention(q, cache_two, md.seq_lens, md.block_tables, 1, SCALE, attn, new_tokens)
    expected = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    cuda_gemv.gemv("plain", attn.view(1, -1), weight, expected)
    # fp32: rotate, write, attend, project.
    q32, k32 = q.clone(), k.clone()
    triton_fused.rotary_embedding_(positions, q32, k32, rotary.cos_cache, rotary.sin_cache, 128)
    cache32 = cache.clone()
    tb.reshape_and_cache(k32, v, cache32, md.slot_mapping)
    exact = _reference(q32, cache32, md).reshape(1, -1) @ weight.float().t()

    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cuda_decode_o.decode_o(q, cache, md.seq_lens, md.block_tables, SCALE, weight, out, new_tokens)
    torch.cuda.synchronize()
    assert torch.equal(cache, cache_two)  # this step's key (rotated) and value, written once
    scale = exact.abs().max().item()
    assert (out.float() - exact).abs().max().item() <= 2e-2 * scale
    assert (out.float() - expected.float()).abs().max().item() <= 2e-2 * scale


@gpu_only
def test_rows_pushed_into_a_site_are_the_plain_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.attention import triton_backend as tb
    from pagedllm.layers import cuda_gemv

    monkeypatch.setenv(cuda_decode_o.ENV_VAR, "1")
    n = 4096
    q, k, v, cache, md, _ = _decode_inputs(300, 4, 4, seed=3)
    weight = (torch.randn(n, 2048, generator=torch.Generator().manual_seed(2)) / 16).to(torch.bfloat16).cuda()
    new_tokens = tb.NewTokens(k, v, md.slot_mapping)
    out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    cuda_decode_o.decode_o(q, cache.clone(), md.seq_lens, md.block_tables, SCALE, weight, out, new_tokens)
    buffer = torch.zeros(cuda_gemv.exchange_buffer_bytes(1, n), dtype=torch.uint8, device="cuda")
    epoch = torch.tensor([6, 0], dtype=torch.int64, device="cuda")  # six calls of the site before
    site = cuda_gemv.Exchange(buffer, (buffer.data_ptr(),), epoch, 0, 1)
    cuda_decode_o.decode_o(q, cache.clone(), md.seq_lens, md.block_tables, SCALE, weight, None, new_tokens, push=site)
    torch.cuda.synchronize()
    words = buffer[: 4 * n].view(torch.int32)
    assert torch.equal((words >> 16) & 0xFFFF, torch.full_like(words, 7))  # tagged with the call
    assert torch.equal((words & 0xFFFF).to(torch.int16).view(torch.bfloat16), out[0])
    assert int(buffer[4 * n:].view(torch.int64)[0]) == n  # every row counted
