"""CUDA graphs for decode steps and for small steps with prefills, replayed with padded inputs.

A step launches hundreds of small kernels; replaying a captured graph removes the CPU launch
cost. Two kinds of graph share one memory pool:

- decode graphs, one per batch size of a ladder: decode-only steps, attention through the
  split-KV decode kernel. The batch is padded up to the next captured size (padding rows write
  to no slot and attend over one token of block 0). A batch size may also have graphs for
  shorter contexts (`context_bounds`: the attention backend picks its kernel by the longest
  context a step can have, e.g. the CUDA decode kernel up to `cuda_decode.MAX_CONTEXT`); a step
  replays the graph of the smallest bound that holds its longest decode.
- prefill graphs, one per token count (16, 32, ..., 256, then every 128 up to
  `max_prefill_tokens`, 2048 by default): any step with a prefill chunk and at most that many
  tokens, every request's attention through the varlen kernel (decodes included). Padding
  tokens write to no slot; padding requests have no query tokens (their `query_start_loc`
  entries repeat the total), so the kernel's spare tiles exit.
  Run eagerly, such a step is bound by the host (Python and launches per layer): a fresh
  128-token prompt's first token took 31.8 ms instead of 6.5 on an H200 (Llama-3.1-8B), and
  under tensor parallelism every all-reduce waits for the slowest rank's host (42.5 ms at TP=2).

Inputs are copied into static buffers and only the real rows of the output are used.
`--enforce-eager` turns both off; `--cuda-graph-max-prefill-tokens 0` only the prefill graphs.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from pagedllm.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The ladder of batch sizes to capture: 1, 2, 4, 8, then every multiple of 8, and
    max_num_seqs itself (none larger)."""
    sizes = [b for b in (1, 2, 4) if b <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:  # e.g. 3 or 12: the largest batch must have a graph too
        sizes.append(max_num_seqs)
    return sizes


PREFILL_GRAPH_STEP = 128  # token granularity of the prefill graphs above 256 tokens


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts of the prefill graphs: powers of two from 16 to 256, then every multiple of
    128 up to max_tokens (and max_tokens itself).

    Past a few hundred tokens a step starts to be bound by its arithmetic, so the padding up to
    the next graph costs real time: 128-token rungs add at most 127 padding tokens, under 12.5%
    of any step of 1024 tokens or more (powers of two would add up to 100%)."""
    sizes = [size for size in (16, 32, 64, 128, 256) if size < max_tokens]
    sizes += range(256 + PREFILL_GRAPH_STEP, max_tokens, PREFILL_GRAPH_STEP)
    if max_tokens > 0:
        sizes.append(max_tokens)
    return sizes


def pad_query_start_loc(query_start_loc: torch.Tensor, out: torch.Tensor) -> None:
    """Write `query_start_loc` [n + 1] into `out` [r + 1] (r >= n), the r - n padding requests
    owning no tokens: their entries repeat the total."""
    n = query_start_loc.shape[0]
    out[:n].copy_(query_start_loc, non_blocking=True)
    out[n:].copy_(query_start_loc[-1:].expand(out.shape[0] - n), non_blocking=True)


# What a graph leaves behind: hidden states, or a pipeline stage's activations by name.
GraphOutput = torch.Tensor | dict[str, torch.Tensor]


def _rows(output: GraphOutput, rows: int) -> GraphOutput:
    """The first `rows` rows of a graph's output (each tensor's, for a stage's activations)."""
    if isinstance(output, dict):
        return {key: tensor[:rows] for key, tensor in output.items()}
    return output[:rows]


class CUDAGraphRunner:
    """Holds the static buffers and the captured graphs (decode: per batch size and context
    bound; prefill: per token count).

    `context_bounds(batch)`: the longest contexts to capture decode graphs of `batch` rows for,
    ascending, besides max_model_len (None: max_model_len only)."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, choose_splits, max_prefill_tokens: int = 0,
                 intermediate_width: int = 0, context_bounds: Callable[[int], list[int]] | None = None) -> None:
        self.model = model
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        # No step the graphs serve holds more tokens than max_batch requests of max_model_len each.
        self.prefill_sizes = prefill_capture_sizes(min(max_prefill_tokens, self.max_batch * max_model_len))
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.choose_splits = choose_splits
        self.context_bounds = {
            batch: sorted({bound for bound in (context_bounds(batch) if context_bounds else []) if bound < max_model_len}
                          | {max_model_len})
            for batch in self.sizes}
        b = self.max_batch
        t = max([b, *self.prefill_sizes])
        self.input_ids = torch.zeros(t, dtype=torch.long, device=device)
        self.positions = torch.zeros(t, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        # The prefill graphs' query_start_loc changes every replay (the decode graphs' never does).
        self.prefill_query_start_loc = torch.zeros(b + 1, dtype=torch.int32, device=device)
        # A pipeline stage after the first starts from the previous stage's activations
        # (`intermediate_width` wide: the hidden size), staged into these buffers.
        self.intermediate: dict[str, torch.Tensor] | None = None
        if intermediate_width:
            dtype = next(model.parameters()).dtype
            self.intermediate = {key: torch.zeros(t, intermediate_width, dtype=dtype, device=device)
                                 for key in model.intermediate_keys}  # type: ignore[union-attr]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch, context bound)
        self.outputs: dict[tuple[int, int], GraphOutput] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_outputs: dict[int, GraphOutput] = {}
        self.pool = None

    def decode_metadata(self, batch: int, max_len: int | None = None) -> AttentionMetadata:
        """The metadata the decode graph of `batch` rows for contexts up to `max_len` (default
        max_model_len) was captured with (static buffers)."""
        max_len = max_len or self.max_model_len
        return AttentionMetadata(
            num_actual_tokens=batch, num_decodes=batch,
            query_start_loc=self.query_start_loc[: batch + 1], seq_lens=self.seq_lens[:batch],
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            max_query_len=1, max_seq_len=max_len,
            query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[max_len] * batch,
            num_kv_splits=self.choose_splits(batch, max_len),
        )

    def decode_context_bound(self, batch: int, metadata: AttentionMetadata) -> int:
        """The context bound of the decode graph of `batch` rows that serves this step: the
        smallest captured one that holds its longest decode."""
        longest = max(metadata.seq_lens_cpu[: metadata.num_reqs], default=0)
        return next(bound for bound in self.context_bounds[batch] if bound >= longest)

    def prefill_metadata(self, tokens: int) -> AttentionMetadata:
        """The metadata the prefill graph of `tokens` tokens was captured with (static buffers)."""
        reqs = min(tokens, self.max_batch)
        return AttentionMetadata(
            num_actual_tokens=tokens, num_decodes=0,
            query_start_loc=self.prefill_query_start_loc[: reqs + 1], seq_lens=self.seq_lens[:reqs],
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:reqs],
            max_query_len=tokens, max_seq_len=self.max_model_len,
            query_start_loc_cpu=[0] + [tokens] * reqs, seq_lens_cpu=[self.max_model_len] * reqs,
        )

    def stage_prefill_capture(self, tokens: int) -> None:
        """Fill the static buffers for the warm-up and capture of the prefill graph of `tokens`
        tokens: whole fresh prompts of at most max_model_len tokens each (the first requests;
        the rest own none), every block-table entry block 0, every slot -1 (nothing written).

        A request must not be longer than max_model_len: the kernels would read its block-table
        row past its end (with one or two rows, past the whole table: an illegal address)."""
        self.slot_mapping.fill_(-1)
        self.block_tables.zero_()
        self.seq_lens.fill_(1)
        reqs = min(tokens, self.max_batch)
        query_lens = [min(self.max_model_len, tokens - start) for start in range(0, tokens, self.max_model_len)]
        if len(query_lens) > reqs:
            raise ValueError(f"a prefill graph of {tokens} tokens cannot be captured with {reqs} requests of at "
                             f"most {self.max_model_len} tokens")
        self.seq_lens[: len(query_lens)].copy_(torch.tensor(query_lens))
        starts = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
        pad_query_start_loc(starts, self.prefill_query_start_loc[: reqs + 1])

    def _capture_one(self, tokens: int, metadata: AttentionMetadata) -> tuple[torch.cuda.CUDAGraph, GraphOutput]:
        args: tuple = (self.input_ids[:tokens], self.positions[:tokens], metadata)
        if self.intermediate is not None:
            args = (*args, {key: buffer[:tokens] for key, buffer in self.intermediate.items()})
        for _ in range(2):  # warm up: Triton compiles, allocator settles
            self.model(*args)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.model(*args)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, output

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        for tokens in reversed(self.prefill_sizes):
            self.stage_prefill_capture(tokens)
            self.prefill_graphs[tokens], self.prefill_outputs[tokens] = self._capture_one(
                tokens, self.prefill_metadata(tokens))
        self.seq_lens.fill_(1)
        for batch in reversed(self.sizes):
            for bound in reversed(self.context_bounds[batch]):
                self.graphs[batch, bound], self.outputs[batch, bound] = self._capture_one(
                    batch, self.decode_metadata(batch, bound))
        torch.cuda.synchronize(self.device)
        logger.info("Captured CUDA graphs for %d decode batch sizes (up to %d; %d of them also for shorter "
                    "contexts) and %d prefill token counts (up to %d) in %.1f s", len(self.sizes), self.max_batch,
                    sum(len(bounds) > 1 for bounds in self.context_bounds.values()), len(self.prefill_sizes),
                    self.prefill_sizes[-1] if self.prefill_sizes else 0, time.perf_counter() - start)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        """True for a decode-only batch no larger than the largest decode graph, or a step with
        prefills of at most the largest prefill graph's tokens."""
        if (metadata.block_tables.shape[1] > self.max_blocks or metadata.num_reqs == 0
                or metadata.num_reqs > self.max_batch):
            return False
        if metadata.num_decodes == metadata.num_reqs == metadata.num_actual_tokens:
            return True
        return bool(self.prefill_sizes) and metadata.num_actual_tokens <= self.prefill_sizes[-1]

    def intermediate_inputs(self, num_tokens: int) -> dict[str, torch.Tensor]:
        """The static buffers (first `num_tokens` rows) that a stage after the first receives the
        previous stage's activations into before `run`."""
        return {key: buffer[:num_tokens] for key, buffer in self.intermediate.items()}  # type: ignore[union-attr]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> GraphOutput:
        """Replay the graph of the smallest captured size that holds the step; returns its hidden
        states (a pipeline stage other than the last: its activations for the next stage, having
        started from those received into `intermediate_inputs`)."""
        if metadata.num_decodes < metadata.num_reqs:
            tokens = self.stage_prefill(input_ids, positions, metadata)
            self.prefill_graphs[tokens].replay()
            return _rows(self.prefill_outputs[tokens], metadata.num_actual_tokens)
        batch = self.stage_decode(input_ids, positions, metadata)
        key = (batch, self.decode_context_bound(batch, metadata))
        self.graphs[key].replay()
        return _rows(self.outputs[key], metadata.num_reqs)

    def _stage(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
               tokens: int) -> None:
        """Copy the step's tokens and requests into the static buffers; tokens past the step's, up
        to `tokens`, write to no slot."""
        n, num_reqs = metadata.num_actual_tokens, metadata.num_reqs
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[n:tokens].fill_(-1)
        self.seq_lens[:num_reqs].copy_(metadata.seq_lens, non_blocking=True)
        width = metadata.block_tables.shape[1]
        self.block_tables[:num_reqs, :width].copy_(metadata.block_tables, non_blocking=True)

    def stage_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> int:
        """Copy a decode-only step into the static buffers, padded; returns the batch size of the
        graph that serves it (whose inputs are then `decode_metadata(batch)` and the first `batch` input
        ids and positions). Padding rows attend over one cached token."""
        batch = next(size for size in self.sizes if size >= metadata.num_reqs)
        self._stage(input_ids, positions, metadata, batch)
        self.seq_lens[metadata.num_reqs : batch].fill_(1)
        return batch

    def stage_prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> int:
        """Copy a step with prefills into the static buffers, padded; returns the token count of
        the graph that serves it (whose inputs are then `prefill_metadata(tokens)` and the first
        `tokens` input ids and positions)."""
        tokens = next(size for size in self.prefill_sizes if size >= metadata.num_actual_tokens)
        self._stage(input_ids, positions, metadata, tokens)
        pad_query_start_loc(metadata.query_start_loc, self.prefill_query_start_loc[: min(tokens, self.max_batch) + 1])
        return tokens
