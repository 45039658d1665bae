"""The all-reduce of a row-parallel decode GEMM, split between the GEMM and the kernel that reads it.

At TP=2 on an 8B model a decode step runs 64 all-reduces of one [batch, hidden] row block each.
Even the one-shot kernel (`one_shot_all_reduce.py`) is a launch, a push, a wait and a sum per call,
~5 us each on H100s: ~10% of the step. Here the all-reduce has no kernel of its own:

- the *producer* (the skinny GEMM of o_proj / down_proj, `layers/triton_gemv.py` with `PUSH`)
  stores each output block, rounded to the activation dtype, into this rank's region of every
  rank's buffer (peers' over NVLink: posted stores, overlapped with the other programs' GEMM
  work), then adds the block's element count to each peer's arrival counter for this rank
  (release, system scope). Its last program (by a ticket counter) waits until every peer's
  counter holds the whole [M, N] (acquire), so when the kernel ends every rank's block is here;
- the *consumer* (the add + RMSNorm skinny GEMM of the next projection,
  `layers/triton_gemv_norm.py` with `GATHER`, or the finish kernel where nothing fuses) sums the
  ranks' regions of its own buffer in rank order as it reads them, in fp32, rounded once: the
  bits the one-shot all-reduce gives, on every rank. It waits for nothing (stream order).

Buffers and counters alternate between two parities. A rank keeps `epoch` (producer calls
completed) and `ticket` (programs of the running producer done) in device memory. A producer
pushes into parity `epoch % 2` and its last program bumps the epoch, so the consumer, which runs
after it, reads parity `(epoch - 1) % 2`. That last program also zeroes the counters it waited
on: the peers add to them again only two producer calls later.

Why two parities suffice: a rank pushes into a peer's parity p again two producer calls later;
before that, its producer of the call in between waited for that peer's pushes of that call,
which the peer made only after its consumer of call p had finished (stream order: every
producer's output is consumed before the next producer runs; `PartialSums` is resolved within
the decoder layer).

The kernels are in deferred_all_reduce_kernels.py. Only one program per producer waits, after
all of its rank's programs have announced their blocks, and it waits only for programs of other
GPUs that never wait on it. No host state: CUDA-graph replayable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedllm.custom_all_reduce import SymmMemAllReduce


@dataclass
class PartialSums:
    """A row-parallel layer's output [M, N] pushed to every rank by its GEMM but not yet summed.

    Pass it to a consumer that sums while it reads (`skinny_add_rmsnorm_linear`), or call
    `resolve()` for the tensor. It must be consumed before the next row-parallel GEMM runs.
    """

    comm: SymmMemAllReduce
    out: torch.Tensor  # [M, N]: what `resolve` fills

    @property
    def shape(self) -> torch.Size:
        """The summed tensor's shape."""
        return self.out.shape

    def resolve(self) -> torch.Tensor:
        """The summed tensor (one small kernel: wait for the peers, add the regions)."""
        from pagedllm.deferred_all_reduce_kernels import finish_

        return finish_(self.comm, self.out)


def resolve(x: torch.Tensor | PartialSums) -> torch.Tensor:
    """`x` as a tensor: summed now if it is a PartialSums."""
    return x.resolve() if isinstance(x, PartialSums) else x
