"""SamplingMetadata: one step's per-request sampling parameters as batched tensors.

Built from the SamplingParams of the rows that sample, and reused (SamplingMetadataCache) while
the same requests sample and nothing depends on their output tokens. Everything the sampler
needs per row is a tensor on the logits' device; the flags let the common cases (all greedy,
no penalties, no top-k, ...) skip whole passes over the [num_reqs, vocab] logits.

Sparse token data (penalties, logit bias, min_tokens) is stored as flat indices into the
logits viewed as one vector, `row * vocab_size + token_id`. Dense [num_reqs, vocab] count and
mask tensors would cost ~150 MB and several full passes per step at batch 256 x 152k vocab;
the flat indices cost O(tokens seen) and are applied with one gather/scatter.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import CachedRequestState


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

    # Nothing in it depends on the rows' output tokens: the same rows may reuse it next step.
    reusable: bool = False


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


def _scalar_rows(params: list[SamplingParams], greedy: list[bool], all_greedy: bool, pen_rows: list[int],
                 vocab_size: int) -> tuple[np.ndarray, list[int] | None]:
    """[7, num_reqs] float32 per-row scalars (temperature, top_k, top_p, min_p, presence,
    frequency, repetition) and the top_k list (None when every row is greedy)."""
    num_reqs = len(params)
    if all_greedy and not pen_rows:
        # Nothing here is read: greedy rows take argmax and no row is penalised. Neutral values
        # without a pass over the rows.
        neutral = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)
        return np.repeat(neutral[:, None], num_reqs, axis=1), None
    top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
    # top_k < 2**24 is exact in float32; numpy converts the lists ~2x faster than torch.tensor.
    scalars = np.array(
        [
            [1.0 if g else p.temperature for g, p in zip(greedy, params)],
            top_k,
            [p.top_p for p in params],
            [p.min_p for p in params],
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.repetition_penalty for p in params],
        ],
        dtype=np.float32,
    ).reshape(7, num_reqs)
    return scalars, top_k


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To CUDA through pinned memory without blocking: a copy from
    pageable memory may wait for the stream, which would stall the host behind the step in
    flight (async scheduling) whenever the batch changes and this metadata is rebuilt."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
    it must live on `device`. The per-row Python work is a few attribute reads per feature;
    rows are looped over only for the features some row uses (logit bias, min_tokens, and
    penalties, the only ones that touch token lists). An all-greedy batch without penalties
    skips the per-row scalars altogether.
    """
    num_reqs = len(params)
    if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_reqs):
        raise ValueError(
            f"build_sampling_metadata needs one entry per row: got {num_reqs} params, "
            f"{len(prompt_token_ids)} prompts, {len(output_token_ids)} outputs, {len(generators)} generators."
        )
    greedy = [p.sampling_type_greedy for p in params]
    random_rows = [i for i in range(num_reqs) if not greedy[i]]
    all_greedy = not random_rows
    pen_rows = [
        i
        for i, p in enumerate(params)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
    ]
    scalars_np, top_k = _scalar_rows(params, greedy, all_greedy, pen_rows, vocab_size)
    # One host array and one copy for every per-row scalar.
    scalars = _to_device(torch.from_numpy(scalars_np), device)

    greedy_rows = [i for i in range(num_reqs) if greedy[i]] if random_rows else list(range(num_reqs))
    seeded = [i for i in random_rows if generators[i] is not None]
    unseeded = [i for i in random_rows if generators[i] is None]

    rep_rows = [i for i in pen_rows if params[i].repetition_penalty != 1.0]
    output_keys = output_counts = seen_keys = None
    if pen_rows:
        output_keys, output_counts, seen_keys = _sparse_token_keys(
            pen_rows, rep_rows, prompt_token_ids, output_token_ids, vocab_size
        )

    bias_keys: list[int] = []
    bias_values: list[float] = []
    for i in [i for i, p in enumerate(params) if p.logit_bias]:
        for token, bias in params[i].logit_bias.items():  # type: ignore[union-attr]
            if 0 <= token < vocab_size:
                bias_keys.append(i * vocab_size + token)
                bias_values.append(bias)
    # Rows that have not produced min_tokens yet: their stop tokens are blocked this step.
    min_tokens_rows = [i for i, p in enumerate(params) if p.min_tokens and len(output_token_ids[i]) < p.min_tokens]
    block_keys: list[int] = []
    for i in min_tokens_rows:
        block_keys.extend(i * vocab_size + t for t in params[i].all_stop_token_ids if 0 <= t < vocab_size)

    asked = [p.logprobs for p in params if p.logprobs is not None]

    def on_device(values: list[int] | list[float] | torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if values is None or len(values) == 0:
            return None
        return _to_device(torch.as_tensor(values, dtype=dtype), device)

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
        all_greedy=all_greedy,
        all_random=not greedy_rows,
        no_top_k=all_greedy or all(top_k[i] == 0 for i in random_rows),  # type: ignore[index]
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
        # Penalties and pending min_tokens read the output tokens; nothing else changes per step.
        reusable=not pen_rows and not min_tokens_rows,
    )


class SamplingMetadataCache:
    """Reuses one SamplingMetadata while the same requests sample, step after step.

    The metadata depends only on the requests' SamplingParams and generators, except for
    penalties and pending min_tokens, which read the output tokens: a batch with any of those
    is rebuilt every step. A request object that leaves and comes back (preemption) is a new
    CachedRequestState, so identity comparison of the rows is exact.
    """

    def __init__(self) -> None:
        self._states: list[CachedRequestState] = []
        self._metadata: SamplingMetadata | None = None

    def get(self, states: list[CachedRequestState], vocab_size: int, device: torch.device) -> SamplingMetadata:
        """The metadata of rows `states` (row i = states[i]), rebuilt only when it may differ."""
        cached = self._metadata
        if (
            cached is not None
            and cached.reusable
            and cached.vocab_size == vocab_size
            and len(states) == len(self._states)
            and all(map(operator.is_, states, self._states))
        ):
            return cached
        self._metadata = build_sampling_metadata(
            [s.sampling_params for s in states],
            [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states],
            [s.generator for s in states],
            vocab_size=vocab_size,
            device=device,
        )
        self._states = list(states)
        return self._metadata
