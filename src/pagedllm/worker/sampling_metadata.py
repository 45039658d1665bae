"""SamplingMetadata: one step's per-request sampling parameters as batched tensors.

Built once per step from the SamplingParams of the rows that sample. Everything the sampler
needs per row is a tensor on the logits' device; the flags let the common cases (all greedy,
no penalties, no top-k, ...) skip whole passes over the [num_reqs, vocab] logits.

Sparse token data (penalties, logit bias, min_tokens) is stored as flat indices into the
logits viewed as one vector, `row * vocab_size + token_id`. Dense [num_reqs, vocab] count and
mask tensors would cost ~150 MB and several full passes per step at batch 256 x 152k vocab;
the flat indices cost O(tokens seen) and are applied with one gather/scatter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """Per-step sampling parameters of a batch of rows, on the logits' device."""

    num_reqs: int
    vocab_size: int

    # [num_reqs] float32. Greedy rows hold 1.0: they are never divided, but a harmless value
    # keeps any batched op over all rows finite.
    temperature: torch.Tensor
    top_k: torch.Tensor  # [num_reqs] int64; 0 = off (values >= vocab_size are stored as 0)
    top_p: torch.Tensor  # [num_reqs] float32; 1.0 = off
    min_p: torch.Tensor  # [num_reqs] float32; 0.0 = off
    presence_penalties: torch.Tensor  # [num_reqs] float32
    frequency_penalties: torch.Tensor  # [num_reqs] float32
    repetition_penalties: torch.Tensor  # [num_reqs] float32

    # Row partition: greedy rows take argmax; random rows are sampled. Seeded random rows are
    # sampled one at a time with their own generator so the batch cannot change their draws.
    greedy_rows: torch.Tensor  # int64 row indices
    unseeded_random_rows: torch.Tensor  # int64 row indices
    seeded_random_rows: list[int]
    generators: list[torch.Generator | None]

    all_greedy: bool
    all_random: bool
    # Flags over the random rows (greedy rows ignore these parameters).
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    # Over all rows (penalties change greedy rows too).
    no_penalties: bool

    # Penalty data, None when no row uses it. Keys are unique flat indices row*vocab + token.
    output_token_keys: torch.Tensor | None  # tokens generated so far (rows with any penalty)
    output_token_counts: torch.Tensor | None  # float32 occurrences of each output key
    seen_token_keys: torch.Tensor | None  # prompt or output tokens (rows with repetition penalty)

    logit_bias_keys: torch.Tensor | None
    logit_bias_values: torch.Tensor | None  # float32, one per key
    # Stop tokens of rows that have not reached min_tokens yet: set to -inf this step.
    min_tokens_keys: torch.Tensor | None

    # Largest `logprobs` asked by any row; None when no row asked (0 = the sampled token only).
    max_num_logprobs: int | None


def _flat_keys(
    rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab_size: int
) -> np.ndarray:
    """Flat indices row * vocab_size + token for every token of every listed row (int64)."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    # np.fromiter over a chained iterator is ~8x faster than torch.tensor on a Python list.
    tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    row_ids = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    # Ids outside the logits (e.g. a tokenizer larger than the model's vocab) cannot be penalised.
    valid = (tokens >= 0) & (tokens < vocab_size)
    return (row_ids * vocab_size + tokens)[valid]


def _unique_with_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their counts, through one sort.

    Faster than the library calls here: torch.unique's parallel sort was ~300x slower on a
    busy 2-core machine, and numpy 2.4's np.unique without counts takes a slow hashing path.
    """
    ordered = np.sort(keys)
    first = np.empty(ordered.size, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return ordered[starts], np.diff(np.append(starts, ordered.size))


def _sparse_token_keys(
    pen_rows: list[int],
    rep_rows: list[int],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Unique output keys with counts, and unique prompt-or-output keys, on the CPU."""
    output_keys, counts = _unique_with_counts(
        _flat_keys(pen_rows, [output_token_ids[i] for i in pen_rows], vocab_size)
    )
    seen_keys = None
    if rep_rows:
        prompt_keys = _flat_keys(rep_rows, [prompt_token_ids[i] for i in rep_rows], vocab_size)
        # Output keys of rows without a repetition penalty are harmless here: x / 1.0 == x.
        seen_keys, _ = _unique_with_counts(np.concatenate([prompt_keys, output_keys]))
    return (
        torch.from_numpy(output_keys) if output_keys.size else None,
        torch.from_numpy(counts.astype(np.float32)) if output_keys.size else None,
        torch.from_numpy(seen_keys) if seen_keys is not None and seen_keys.size else None,
    )


def build_sampling_metadata(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
) -> SamplingMetadata:
    """Batch the sampling parameters of the rows that sample this step (row i = params[i]).

    `generators[i]` is the persistent generator of a seeded request (None when unseeded);
    it must live on `device`. Runs every step, so the per-row Python work is a few attribute
    reads; token lists are only touched for rows that use penalties or min_tokens.
    """
    num_reqs = len(params)
    if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_reqs):
        raise ValueError(
            f"build_sampling_metadata needs one entry per row: got {num_reqs} params, "
            f"{len(prompt_token_ids)} prompts, {len(output_token_ids)} outputs, {len(generators)} generators."
        )
    greedy = [p.sampling_type_greedy for p in params]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
    # One host tensor and one copy for every per-row scalar; top_k < 2**24 is exact in float32.
    scalars = torch.tensor(
        [
            [1.0 if g else p.temperature for g, p in zip(greedy, params)],
            top_k,
            [p.top_p for p in params],
            [p.min_p for p in params],
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.repetition_penalty for p in params],
        ],
        dtype=torch.float32,
    ).view(7, num_reqs).to(device)

    greedy_rows = [i for i in range(num_reqs) if greedy[i]]
    random_rows = [i for i in range(num_reqs) if not greedy[i]]
    seeded = [i for i in random_rows if generators[i] is not None]
    unseeded = [i for i in random_rows if generators[i] is None]

    pen_rows = [
        i
        for i, p in enumerate(params)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
    ]
    rep_rows = [i for i in pen_rows if params[i].repetition_penalty != 1.0]
    output_keys = output_counts = seen_keys = None
    if pen_rows:
        output_keys, output_counts, seen_keys = _sparse_token_keys(
            pen_rows, rep_rows, prompt_token_ids, output_token_ids, vocab_size
        )

    bias_keys: list[int] = []
    bias_values: list[float] = []
    block_keys: list[int] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                if 0 <= token < vocab_size:
                    bias_keys.append(i * vocab_size + token)
                    bias_values.append(bias)
        if p.min_tokens and len(output_token_ids[i]) < p.min_tokens:
            block_keys.extend(i * vocab_size + t for t in p.all_stop_token_ids if 0 <= t < vocab_size)

    asked = [p.logprobs for p in params if p.logprobs is not None]

    def on_device(values: list[int] | list[float] | torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if values is None or len(values) == 0:
            return None
        return torch.as_tensor(values, dtype=dtype).to(device)

    empty_rows = torch.empty(0, dtype=torch.int64)
    return SamplingMetadata(
        num_reqs=num_reqs,
        vocab_size=vocab_size,
        temperature=scalars[0],
        top_k=scalars[1].to(torch.int64),
        top_p=scalars[2],
        min_p=scalars[3],
        presence_penalties=scalars[4],
        frequency_penalties=scalars[5],
        repetition_penalties=scalars[6],
        greedy_rows=on_device(greedy_rows, torch.int64) if greedy_rows else empty_rows.to(device),
        unseeded_random_rows=on_device(unseeded, torch.int64) if unseeded else empty_rows.to(device),
        seeded_random_rows=seeded,
        generators=list(generators),
        all_greedy=not random_rows,
        all_random=not greedy_rows,
        no_top_k=all(top_k[i] == 0 for i in random_rows),
        no_top_p=all(params[i].top_p >= 1.0 for i in random_rows),
        no_min_p=all(params[i].min_p <= 0.0 for i in random_rows),
        no_penalties=not pen_rows,
        output_token_keys=on_device(output_keys, torch.int64),
        output_token_counts=on_device(output_counts, torch.float32),
        seen_token_keys=on_device(seen_keys, torch.int64),
        logit_bias_keys=on_device(bias_keys, torch.int64),
        logit_bias_values=on_device(bias_values, torch.float32),
        min_tokens_keys=on_device(block_keys, torch.int64),
        max_num_logprobs=max(asked) if asked else None,
    )
