"""The all-reduce inside the skinny GEMM, in the interpreter: ranks simulated one after another.

A rank's last GEMM program waits for its peers' announcements, so ranks cannot run one after
another as they are: before rank r runs, the ranks after it are made to look as if they had
pushed their blocks (their GEMM output in their region of rank r's buffer, their counts on rank
r's counters), exactly the state their own kernels leave; their real announcements, which in a
real run come before rank r's wait, are taken back afterwards. Each rank's output must be the
rank-ordered fp32 sum of the ranks' GEMM outputs (each rounded to the activation dtype, as the
unfused GEMM + all-reduce rounds them), identical on every rank, over calls of both parities.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm.gemm_all_reduce import MAX_SUM_ELEMENTS
from pagedllm.layers.triton_gemv import GemvConfig, skinny_linear, skinny_linear_all_reduce

SLOT = 4096
DOT = GemvConfig(block_n=16, block_k=32, use_dot=True, num_warps=4, num_stages=2)
FMA = GemvConfig(block_n=16, block_k=32, use_dot=False, num_warps=4, num_stages=2)


def simulated_ranks(world: int, dtype: torch.dtype) -> list[SimpleNamespace]:
    """Per-rank communicators with the attributes the kernel reads, buffers in host memory."""
    data = [torch.zeros(2 * world * SLOT, dtype=dtype) for _ in range(world)]
    arrivals = [torch.zeros(world * 2, dtype=torch.int32) for _ in range(world)]
    push_ptrs = torch.tensor([d.data_ptr() for d in data], dtype=torch.int64)
    arrival_ptrs = torch.tensor([a.data_ptr() for a in arrivals], dtype=torch.int64)
    return [SimpleNamespace(rank=r, world_size=world, slot_numel=SLOT, push_data=data[r], own_arrivals=arrivals[r],
                            push_state=torch.zeros(2, dtype=torch.int32), push_ptrs=push_ptrs,
                            arrival_ptrs=arrival_ptrs,
                            can_fuse=lambda numel, dt: dt == dtype and 0 < numel <= min(SLOT, MAX_SUM_ELEMENTS))
            for r in range(world)]


def all_reduce_in_gemm(ranks: list[SimpleNamespace], xs: list[torch.Tensor], weights: list[torch.Tensor],
                       **kwargs) -> list[torch.Tensor]:
    """Every rank's call, as the module docstring describes; the outputs by rank."""
    parity = int(ranks[0].push_state[0]) % 2
    m, n = xs[0].shape[0], weights[0].shape[0]
    partials = [skinny_linear(x, w, **kwargs) for x, w in zip(xs, weights)]
    outs = []
    for rank, comm in enumerate(ranks):
        for later in range(rank + 1, len(ranks)):
            start = (parity * len(ranks) + later) * SLOT
            comm.push_data[start : start + m * n] = partials[later].flatten()
            comm.own_arrivals[later * 2 + parity] = m * n
        outs.append(skinny_linear_all_reduce(xs[rank], weights[rank], comm, **kwargs))
    for rank, comm in enumerate(ranks):
        for later in range(rank + 1, len(ranks)):
            assert int(comm.own_arrivals[later * 2 + parity]) == m * n  # announced again, for real
            comm.own_arrivals[later * 2 + parity] = 0
    assert all(int(v) == 0 for comm in ranks for v in comm.own_arrivals)  # every wait consumed its counts
    return outs


def rank_ordered_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    acc = parts[0].float()
    for part in parts[1:]:
        acc = acc + part.float()
    return acc.to(parts[0].dtype)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("config", [DOT, FMA], ids=["dot", "fma"])
def test_every_rank_gets_the_rank_ordered_sum_over_calls_of_both_parities(world: int, config: GemvConfig) -> None:
    ranks = simulated_ranks(world, torch.float32)
    gen = torch.Generator().manual_seed(world)
    n, k = 48, 64
    for call, m in enumerate((1, 2, 1, 2)):
        xs = [torch.randn(m, k, generator=gen) for _ in range(world)]
        weights = [torch.randn(n, k, generator=gen) for _ in range(world)]
        expected = rank_ordered_sum([skinny_linear(x, w, config=config) for x, w in zip(xs, weights)])
        for out in all_reduce_in_gemm(ranks, xs, weights, config=config):
            assert torch.equal(out, expected)
        for comm in ranks:  # one call counted, its tickets given back
            assert comm.push_state.tolist() == [call + 1, 0]


def test_gated_input_and_more_than_one_sum_block() -> None:
    ranks = simulated_ranks(2, torch.float32)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 2 * 64, generator=gen) for _ in range(2)]
    weights = [torch.randn(1000, 64, generator=gen) for _ in range(2)]  # 3000 elements: 3 blocks summed
    expected = rank_ordered_sum([skinny_linear(x, w, config=DOT, act="silu") for x, w in zip(xs, weights)])
    for out in all_reduce_in_gemm(ranks, xs, weights, act="silu", config=DOT):
        assert torch.equal(out, expected)


def test_bf16_outputs_are_rounded_before_the_sum() -> None:
    ranks = simulated_ranks(2, torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, 64, generator=gen).bfloat16() for _ in range(2)]
    weights = [torch.randn(32, 64, generator=gen).bfloat16() for _ in range(2)]
    parts = [skinny_linear(x, w, config=DOT) for x, w in zip(xs, weights)]
    want = parts[0].float() + parts[1].float()
    for out in all_reduce_in_gemm(ranks, xs, weights, config=DOT):
        # One rounding of the fp32 sum (the interpreter may truncate rather than round to nearest).
        assert torch.allclose(out.float(), want, rtol=2 ** -7, atol=0)


def test_refuses_outputs_too_large_and_configs_with_split_k() -> None:
    comm = simulated_ranks(2, torch.float32)[0]
    with pytest.raises(ValueError, match="cannot be all-reduced"):
        skinny_linear_all_reduce(torch.zeros(2, 8), torch.zeros(SLOT, 8), comm)
    split = GemvConfig(block_n=16, block_k=32, split_k=2)
    with pytest.raises(ValueError, match="without split-K"):
        skinny_linear_all_reduce(torch.zeros(1, 64), torch.zeros(16, 64), comm, config=split)
