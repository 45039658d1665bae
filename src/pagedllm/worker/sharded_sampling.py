"""Sampling from logits split over the tensor-parallel ranks, without gathering them.

With a vocabulary-parallel LM head each rank computes the logits of its slice of the vocabulary.
The plain path all-gathers them (at batch 256 x 151,936 bf16, 78 MB a step), every rank samples
the same rows, and the output rank's tokens are broadcast. But a greedy token is an argmax, and so
is a temperature-only draw (the Gumbel-max race of triton_sampling.py), and an argmax splits:
each rank finds the winner (key, token id) of each chunk of its slice, the ranks all-gather those
partials (a few bytes per row and chunk) in one collective, and every rank reduces the same
partials alike, so all ranks hold the same tokens with no broadcast. Where the custom all-reduce
runs (NVLink), one kernel does the exchange and the reduce instead (`VocabShard.exchange`,
one_shot_argmax.py).

The partial kernels number tokens and draw noise as over the whole vocabulary, so the tokens are
the unsplit kernels' bit for bit (for the same seed): the reduce takes the largest key and the
smallest token id among ties, whatever the order of the chunks. Without the Triton kernels (CPU),
greedy rows take a torch argmax per rank with the same rule.

Rows that need whole rows of logits (logprobs, penalties, logit bias, min_tokens, top-k / top-p /
min-p, seeded generators, logits processors) keep the gathered path: `sharded_applies` decides
per step. `PAGEDLLM_SHARDED_SAMPLING=0` turns this off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from pagedllm.envs import on_by_default
from pagedllm.worker.sampling_metadata import SamplingMetadata

ENV_VAR = "PAGEDLLM_SHARDED_SAMPLING"
_NO_ID = torch.iinfo(torch.int32).max


def enabled_by_env() -> bool:
    """False when PAGEDLLM_SHARDED_SAMPLING is '0' or 'false' (on by default)."""
    return on_by_default(ENV_VAR)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary, and how to reach the other ranks' partials."""

    col_offset: int  # the token id of this rank's first logit
    num_tokens: int  # how many of this rank's logits are tokens (the rest is padding)
    vocab_size: int  # the whole vocabulary
    all_gather: Callable[[torch.Tensor], torch.Tensor]  # x [1, ...] -> [ranks, ...], in rank order
    # The one-shot exchange over symmetric memory (one_shot_argmax.py), where the custom
    # all-reduce runs; else None and the partials go through all_gather.
    exchange: PartialsExchange | None = None


@dataclass(frozen=True)
class Partials:
    """Per row, the winner of each chunk of the vocabulary that a partial pass read: key (the
    logit, or the race key) and token id; `inf_*`, the race among +inf logits (race only)."""

    keys: torch.Tensor  # [rows, chunks] fp32
    ids: torch.Tensor  # [rows, chunks] int32
    inf_keys: torch.Tensor | None = None
    inf_ids: torch.Tensor | None = None
    block_c: int = 1  # a power of two >= chunks: the reduce's tile (see triton_sampling)

    def arrays(self) -> list[torch.Tensor]:
        """The tensors this holds, in a fixed order."""
        return [t for t in (self.keys, self.ids, self.inf_keys, self.inf_ids) if t is not None]


class PartialsExchange(Protocol):
    """Every rank's partials reduced to the same tokens by one collective kernel."""

    def fits(self, partials: Partials) -> bool:
        """Whether these partials can go through it (every rank decides alike: shapes only)."""
        ...

    def __call__(self, partials: Partials) -> torch.Tensor:
        """The tokens [rows] int64 that every rank's partials reduce to."""
        ...


def sharded_applies(md: SamplingMetadata, fused_random: bool, col_offset: int) -> bool:
    """Whether a step with metadata `md` can be sampled from this rank's slice of the logits.

    `fused_random`: whether the Triton race serves this batch's unseeded random rows
    (Sampler._fused_random); it also needs col_offset % 4 == 0 (whole Philox groups).
    """
    if not enabled_by_env():
        return False
    if not (md.max_num_logprobs is None and md.logit_bias_keys is None and md.min_tokens_keys is None
            and md.no_penalties and not md.seeded_random_rows):
        return False
    return md.all_greedy or (fused_random and col_offset % 4 == 0)


def gather_partials(partials: list[Partials | None], all_gather: Callable[[torch.Tensor], torch.Tensor]
                    ) -> list[Partials | None]:
    """Every rank's `partials` (alike in number and shapes on every rank), joined along the
    chunk axis in rank order, through one all-gather of their bytes."""
    arrays = [a for p in partials if p is not None for a in p.arrays()]
    if not arrays:
        return partials
    flat = torch.cat([a.contiguous().view(torch.int32).reshape(-1) for a in arrays])
    gathered = all_gather(flat.unsqueeze(0))  # [ranks, total]
    ranks, start = gathered.shape[0], 0
    joined = []
    for a in arrays:
        rows, chunks = a.shape
        part = gathered[:, start : start + a.numel()].reshape(ranks, rows, chunks)
        # contiguous: with one chunk per rank the reshape would be a strided view
        joined.append(part.permute(1, 0, 2).contiguous().view(rows, ranks * chunks).view(a.dtype))
        start += a.numel()
    out: list[Partials | None] = []
    for p in partials:
        if p is None:
            out.append(None)
            continue
        n = len(p.arrays())
        mine, joined = joined[:n], joined[n:]
        inf = (mine[2], mine[3]) if n == 4 else (None, None)
        # ranks * block_c rounded up to a power of two still covers every chunk
        out.append(replace(p, keys=mine[0], ids=mine[1], inf_keys=inf[0], inf_ids=inf[1],
                           block_c=p.block_c * (1 << (ranks - 1).bit_length())))
    return out


def argmax_partials_torch(logits: torch.Tensor, col_offset: int) -> Partials:
    """Each row's first maximum (NaN counted as -inf) as one partial, ids from `col_offset`."""
    x = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if x.shape[-1] == 0:  # an empty slice: nothing wins
        return Partials(torch.full((x.shape[0], 1), float("-inf"), device=x.device),
                        torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device))
    index = x.argmax(-1, keepdim=True)
    keys = x.gather(-1, index)
    return Partials(keys, (index + col_offset).to(torch.int32))


def reduce_partials_torch(partials: Partials) -> torch.Tensor:
    """`triton_sampling.reduce_partials` of greedy partials (no +inf race) in torch: [rows] int64."""
    best = partials.keys.amax(-1, keepdim=True)
    first = torch.where(partials.keys == best, partials.ids, _NO_ID).amin(-1)
    return torch.where(best.squeeze(-1) > float("-inf"), first, 0).to(torch.int64)


def sample_sharded(logits: torch.Tensor, md: SamplingMetadata, shard: VocabShard, use_triton: bool,
                   seed: int) -> torch.Tensor:
    """One token per row from this rank's logits [rows, width]: the same tokens on every rank.

    Only where `sharded_applies` held. The first shard.num_tokens columns are tokens, and the
    width is the same on every rank, so the ranks' partials have one shape. `use_triton`: the
    Triton kernels (needed for random rows), else torch (greedy rows only); `seed`: the race's,
    alike on every rank for runs that reproduce."""
    if use_triton:
        from pagedllm.worker import triton_sampling  # imports triton: only on this path

        argmax_partials: Callable[[torch.Tensor, int], Partials] = (
            lambda x, offset: triton_sampling.argmax_partials(x, col_offset=offset, num_tokens=shard.num_tokens))
        reduce_greedy: Callable[[Partials], torch.Tensor] = triton_sampling.reduce_partials
    else:  # one partial per row and rank whatever the width: the padding can be sliced off
        argmax_partials = lambda x, offset: argmax_partials_torch(x[:, : shard.num_tokens], offset)  # noqa: E731
        reduce_greedy = reduce_partials_torch
    greedy = None if md.all_random else argmax_partials(logits, shard.col_offset)
    race = None
    random_rows = None if md.all_random else md.unseeded_random_rows
    if md.all_random or random_rows.numel():  # type: ignore[union-attr]
        from pagedllm.worker import triton_sampling  # random rows: sharded_applies asked for the kernels

        race = triton_sampling.race_partials(logits, md.temperature, seed, random_rows, col_offset=shard.col_offset,
                                             num_tokens=shard.num_tokens, vocab_size=shard.vocab_size)
    exchange = shard.exchange if use_triton else None
    if exchange is not None and all(p is None or exchange.fits(p) for p in (greedy, race)):
        # One kernel per kind of partials exchanges and reduces them (no all-gather, no reshapes).
        sampled = None if greedy is None else exchange(greedy)
        drawn = None if race is None else exchange(race)
    else:
        greedy, race = gather_partials([greedy, race], shard.all_gather)
        sampled = None if greedy is None else reduce_greedy(greedy)
        drawn = None if race is None else triton_sampling.reduce_partials(race)
    if drawn is None:
        return sampled  # type: ignore[return-value]
    if sampled is None:
        return drawn
    sampled[random_rows] = drawn
    return sampled
