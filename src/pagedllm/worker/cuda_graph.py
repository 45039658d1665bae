"""CUDA graphs for decode-only steps: captured once per batch size, replayed with padded inputs.

A decode step launches hundreds of small kernels; replaying a captured graph removes the CPU
launch cost. Inputs are copied into static buffers, the batch is padded up to the next captured
size (padding rows write to no slot and attend over one token of block 0), and only the real
rows of the output are used. `--enforce-eager` turns this off.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pagedllm.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The ladder of batch sizes to capture: 1, 2, 4, 8, then every multiple of 8."""
    sizes = [b for b in (1, 2, 4) if b <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs and max_num_seqs > 8:
        sizes.append(max_num_seqs)
    return sizes


class CUDAGraphRunner:
    """Holds the static buffers and one captured graph per decode batch size."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, choose_splits) -> None:
        self.model = model
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.choose_splits = choose_splits
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=batch, num_decodes=batch,
            query_start_loc=self.query_start_loc[: batch + 1], seq_lens=self.seq_lens[:batch],
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[self.max_model_len] * batch,
            num_kv_splits=self.choose_splits(batch, self.max_model_len),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        for batch in reversed(self.sizes):
            metadata = self._metadata(batch)
            args = (self.input_ids[:batch], self.positions[:batch], metadata)
            for _ in range(2):  # warm up: Triton compiles, allocator settles
                self.model(*args)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[batch] = self.model(*args)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        logger.info("Captured CUDA graphs for %d batch sizes (up to %d) in %.1f s",
                    len(self.sizes), self.max_batch, time.perf_counter() - start)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        """True for a decode-only batch no larger than the largest captured size."""
        return (metadata.num_decodes == metadata.num_reqs == metadata.num_actual_tokens
                and 0 < metadata.num_reqs <= self.max_batch
                and metadata.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of the smallest captured size >= the batch; returns its hidden states."""
        n = metadata.num_reqs
        batch = next(size for size in self.sizes if size >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[n:batch].fill_(-1)
        self.seq_lens[:n].copy_(metadata.seq_lens, non_blocking=True)
        self.seq_lens[n:batch].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(metadata.block_tables, non_blocking=True)
        self.graphs[batch].replay()
        return self.outputs[batch][:n]
