"""The deferred all-reduce in the interpreter: ranks simulated one after another in a process.

A producer (skinny GEMM with PUSH) ends by waiting for its peers' announcements, so ranks
cannot run one after another as they are: before rank r's producer runs, the ranks after it are
made to look as if they had announced their blocks (their counts on rank r's counters; their
data arrives when they run, before any consumer), and their real announcements, which in a
real run come before rank r's wait, are taken back afterwards. Consumers (the add + RMSNorm
GEMM with GATHER, or `resolve`) then find every rank's block in their buffer. Each rank's result must be the rank-ordered fp32 sum of the ranks' GEMM
outputs (each rounded to the activation dtype, as the unfused GEMM + all-reduce rounds it), bit
for bit what the unfused path computes from that sum, on every rank, over calls of both parities.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm.deferred_all_reduce import PartialSums
from pagedllm.layers.triton_gemv import GemvConfig, skinny_linear, skinny_linear_push
from pagedllm.layers.triton_gemv_norm import skinny_add_rmsnorm_linear

SLOT = 4096
DOT = GemvConfig(block_n=16, block_k=32, use_dot=True, num_warps=4, num_stages=2)
FMA = GemvConfig(block_n=16, block_k=32, use_dot=False, num_warps=4, num_stages=2)


def simulated_ranks(world: int, dtype: torch.dtype) -> list[SimpleNamespace]:
    """Per-rank communicators with the attributes the kernels read, buffers in host memory."""
    data = [torch.zeros(2 * world * SLOT, dtype=dtype) for _ in range(world)]
    arrivals = [torch.zeros(world * 2, dtype=torch.int32) for _ in range(world)]
    push_ptrs = torch.tensor([d.data_ptr() for d in data], dtype=torch.int64)
    arrival_ptrs = torch.tensor([a.data_ptr() for a in arrivals], dtype=torch.int64)
    return [SimpleNamespace(rank=r, world_size=world, dtype=dtype, slot_numel=SLOT, push_data=data[r],
                            own_arrivals=arrivals[r], push_state=torch.zeros(2, dtype=torch.int32),
                            push_ptrs=push_ptrs, arrival_ptrs=arrival_ptrs,
                            can_push=lambda numel, dt: dt == dtype and 0 < numel <= SLOT)
            for r in range(world)]


def push_all(ranks: list[SimpleNamespace], xs: list[torch.Tensor], weights: list[torch.Tensor],
             **kwargs) -> list[PartialSums]:
    """Every rank's producer call, as the module docstring describes."""
    parity = int(ranks[0].push_state[0]) % 2
    total = xs[0].shape[0] * weights[0].shape[0]
    pending = []
    for rank, comm in enumerate(ranks):
        for later in range(rank + 1, len(ranks)):
            comm.own_arrivals[later * 2 + parity] = total
        pending.append(skinny_linear_push(xs[rank], weights[rank], comm, **kwargs))
    for rank, comm in enumerate(ranks):
        for later in range(rank + 1, len(ranks)):
            assert int(comm.own_arrivals[later * 2 + parity]) == total  # announced again, for real
            comm.own_arrivals[later * 2 + parity] = 0
    assert all(int(v) == 0 for comm in ranks for v in comm.own_arrivals)  # every wait consumed its counts
    return pending


def rank_ordered_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    acc = parts[0].float()
    for part in parts[1:]:
        acc = acc + part.float()
    return acc.to(parts[0].dtype)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("producer", [DOT, FMA], ids=["dot", "fma"])
def test_resolve_and_the_norm_gemm_give_the_rank_ordered_sum_on_every_rank(world: int, producer: GemvConfig) -> None:
    ranks = simulated_ranks(world, torch.float32)
    gen = torch.Generator().manual_seed(world)
    n, k, n_next = 48, 64, 40
    norm_weight = torch.randn(n, generator=gen)
    w_next = torch.randn(n_next, n, generator=gen)
    for call, m in enumerate((1, 2, 1, 2, 1)):  # both parities, twice
        if producer is FMA and m > 2:
            continue
        xs = [torch.randn(m, k, generator=gen) for _ in range(world)]
        weights = [torch.randn(n, k, generator=gen) for _ in range(world)]
        expected = rank_ordered_sum([skinny_linear(x, w, config=producer) for x, w in zip(xs, weights)])
        pending = push_all(ranks, xs, weights, config=producer)
        assert all(isinstance(p, PartialSums) and p.shape == (m, n) for p in pending)
        residual = torch.randn(m, n, generator=gen)
        want_out, want_res = skinny_add_rmsnorm_linear(expected, residual, norm_weight, 1e-6, w_next, config=DOT)
        for p in pending:
            if call % 2:  # the sum inside the consuming kernel
                out, res = skinny_add_rmsnorm_linear(p, residual, norm_weight, 1e-6, w_next, config=DOT)
                assert torch.equal(out, want_out) and torch.equal(res, want_res)
            assert torch.equal(p.resolve(), expected)  # reading again is harmless
        for comm in ranks:  # one producer call counted, its tickets given back
            assert comm.push_state.tolist() == [call + 1, 0]


def test_gated_producer_sums_the_activated_gemm() -> None:
    ranks = simulated_ranks(2, torch.float32)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 2 * 64, generator=gen) for _ in range(2)]
    weights = [torch.randn(32, 64, generator=gen) for _ in range(2)]
    expected = rank_ordered_sum([skinny_linear(x, w, config=DOT, act="silu") for x, w in zip(xs, weights)])
    pending = push_all(ranks, xs, weights, act="silu", config=DOT)
    for p in pending:
        assert torch.equal(p.resolve(), expected)


def test_bf16_blocks_are_rounded_before_the_sum() -> None:
    ranks = simulated_ranks(2, torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, 64, generator=gen).bfloat16() for _ in range(2)]
    weights = [torch.randn(32, 64, generator=gen).bfloat16() for _ in range(2)]
    parts = [skinny_linear(x, w, config=DOT) for x, w in zip(xs, weights)]
    pending = push_all(ranks, xs, weights, config=DOT)
    want = parts[0].float() + parts[1].float()
    for p in pending:
        # One rounding of the fp32 sum (the interpreter may truncate rather than round to nearest).
        assert torch.allclose(p.resolve().float(), want, rtol=2 ** -7, atol=0)


def test_refuses_blocks_that_do_not_fit_and_pushing_configs_with_split_k() -> None:
    comm = simulated_ranks(2, torch.float32)[0]
    with pytest.raises(ValueError, match="does not fit"):
        skinny_linear_push(torch.zeros(2, 8), torch.zeros(SLOT, 8), comm)
    split = GemvConfig(block_n=16, block_k=32, split_k=2)
    with pytest.raises(ValueError, match="without split-K"):
        skinny_linear_push(torch.zeros(1, 64), torch.zeros(16, 64), comm, config=split)
