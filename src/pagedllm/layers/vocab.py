"""Token embedding and LM head, split along the vocabulary for tensor parallelism."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import (
    get_custom_all_reduce,
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.layers.custom_op import CustomOp
from pagedllm.layers.linear import fused_linear


# Under tensor parallelism each rank's slice holds a multiple of this many rows, so that every
# slice starts on a 16-byte boundary of bf16 logits and on a whole Philox group of the sampler's
# race (sharded_sampling.py needs token offsets that are multiples of 4).
_PARTITION_MULTIPLE = 16


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary entries) are split across ranks, padded to divide evenly
    (each rank's slice a multiple of 16 rows with tensor parallelism)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.num_per_partition = -(-vocab_size // self.tp_size)
        if self.tp_size > 1:
            self.num_per_partition = -(-self.num_per_partition // _PARTITION_MULTIPLE) * _PARTITION_MULTIPLE
        self.vocab_start = self.tp_rank * self.num_per_partition
        self.weight = nn.Parameter(torch.zeros(self.num_per_partition, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's vocabulary rows (the padding rows stay zero)."""
        rows = loaded[self.vocab_start : self.vocab_start + self.num_per_partition]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Look up token embeddings [T] -> [T, hidden]."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        custom = get_custom_all_reduce()
        fused = None if custom is None else custom.embedding_all_reduce(input_ids, self.weight, self.vocab_start)
        if fused is not None:  # the lookup and the all-reduce in one launch (decode-sized steps)
            return fused
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_per_partition)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, CustomOp):
    """Output projection to vocabulary logits; may share its weight with the embedding.

    A CustomOp for its switch only (`use_fused_kernels`, set by set_fused_kernels and the
    environment): `forward` stays the embedding lookup, and `compute_logits` takes the
    skinny-GEMM kernel for few CUDA rows when the switch is on.
    """

    skinny_gemm = True  # see layers/linear.py:set_skinny_gemm

    @property
    def num_local_tokens(self) -> int:
        """How many of this rank's vocabulary rows are real tokens (the last rank's padding is not)."""
        return max(0, min(self.num_per_partition, self.vocab_size - self.vocab_start))

    def compute_logits(self, hidden_states: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Logits [N, vocab_size] for hidden states [N, hidden], gathered across ranks; with
        `gather=False` this rank's only, [N, num_per_partition]: tokens from vocab_start on, of
        which the first num_local_tokens are real (the same width on every rank)."""
        if self.skinny_gemm and self.use_fused_path(hidden_states):
            logits = fused_linear(hidden_states, self.weight)
        else:
            logits = F.linear(hidden_states, self.weight)
        if not gather:
            return logits
        logits = tensor_model_parallel_all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
