"""The all-reduce of a row-parallel decode GEMM, split between the GEMM and the kernel that reads it.

At TP=2 on an 8B model a decode step runs 64 all-reduces of one [batch, hidden] row block each.
Even the one-shot kernel (`one_shot_all_reduce.py`) is a launch, a push, a wait and a sum per call,
~5 us each on H100s: ~10% of the step. Here the all-reduce has no kernel of its own:

- the *producer* (the skinny GEMM of o_proj / down_proj, `layers/triton_gemv.py` with `PUSH`)
  stores each output tile, rounded to the activation dtype, into this rank's region of every
  rank's buffer (peers' over NVLink: posted stores, no round trip), then adds the tile's element
  count to each peer's arrival counter for this rank (release, system scope);
- the *consumer* (the add + RMSNorm skinny GEMM of the next projection,
  `layers/triton_gemv_norm.py` with `GATHER`, or `finish_kernel` where nothing fuses) waits until
  every peer's counter holds the whole [M, N] (acquire) and sums the ranks' regions of its own
  buffer in rank order, in fp32, rounded once: the bits the one-shot kernel gives, on every rank.

Buffers and counters alternate between two parities. The state a rank keeps in device memory is
`epoch` (producer calls completed) and `ticket` (programs of the running producer done). A
producer pushes into parity `epoch % 2`; its last program (by ticket) bumps the epoch, so the
consumer, which runs after it in stream order, reads parity `(epoch - 1) % 2`.

Why two parities suffice: a rank pushes into a peer's parity p again two producer calls later;
by then the peer has run the consumer of the call in between, which waited for this rank's pushes
of that call, which this rank made only after its own consumer of call p had finished (stream
order: every producer's output is consumed before the next producer runs; `PartialSums` is
resolved within the decoder layer). A rank's received-element counter of parity p is zeroed by
program 0 of its next producer (the call of the other parity), before that program announces its
own tile: the peer can add to it again only after seeing that announcement.

The kernels are in deferred_all_reduce_kernels.py. Producers never wait, so no program can block one that would free it; consumers wait only for
producers that already ran or run on another GPU. No host state: CUDA-graph replayable.
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
