"""The runner's per-request state and the flat batch built from it each step.

`prepare_inputs` runs on the host before every forward pass, so it avoids per-token and (where
it can) per-request Python work: per-request values are gathered with one comprehension each
and combined with numpy; a decode's input is one lookup. With `InputBuffers` (the runner keeps
one), block tables live in a persistent table that only receives new block ids, and every int
array of the step is packed into one (pinned, on CUDA) host buffer and sent with one copy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.sampling_params import SamplingParams


# A sampled token not fetched from the device yet. A decode whose input it is takes the token
# from InputBuffers.last_token (device) instead.
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class CachedRequestState:
    """What the runner remembers about a request between steps."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    # As of the start of the step being run: the scheduler sends it with every scheduled request.
    num_computed_tokens: int
    # Prompt + output tokens, the source of each step's input ids.
    token_ids: list[int] = field(default_factory=list)
    # This request's row in the persistent block table of `block_table_owner` (an InputBuffers).
    block_table_row: int = field(default=-1, repr=False, compare=False)
    block_table_owner: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    def append_output_token(self, token_id: int) -> None:
        """Record a token this runner sampled (the scheduler learns it from the runner output).

        PLACEHOLDER_TOKEN_ID stands for a token still on the device (its step's output not
        fetched yet); `resolve_output_token` fills it in.
        """
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def resolve_output_token(self, output_index: int, token_id: int) -> None:
        """Replace the placeholder at output position `output_index` by the sampled token."""
        self.output_token_ids[output_index] = token_id
        self.token_ids[self.num_prompt_tokens + output_index] = token_id


@dataclass
class BatchInputs:
    """One step's flat batch: token ids, positions and attention metadata, plus sampling rows."""

    req_ids: list[str]  # in batch order (decodes first)
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Index into the flat tokens of each request that samples this step (its last token).
    logits_indices: torch.Tensor
    sampling_req_ids: list[str]
    # req_id -> (first flat index, number of rows, first prompt position) for prompt logprobs.
    prompt_logprob_spans: dict[str, tuple[int, int, int]]
    # Persistent block-table row of each sampling request: where its sampled token is kept on the
    # device (InputBuffers.last_token) for the next step's input.
    sampling_table_rows: torch.Tensor
    # Flat token index of each decode ahead (SchedulerOutput.decode_ahead_req_ids), or None.
    decode_ahead_index: torch.Tensor | None = None
    # Every token is a sampling request's last (one-token requests, all sampling): logits_indices
    # is 0 .. n-1, and the LM head can read the first n hidden rows as they are.
    logits_rows_are_tokens: bool = False


class InputBuffers:
    """Host state kept across steps by one runner: a persistent block table and a staging buffer.

    Block table: one row per running request (its `block_table_row`), filled with the block ids
    it did not hold yet; a step gathers its rows with one numpy take instead of converting every
    request's block list. A row is given to a new request zeroed, so entries past a request's
    blocks are 0 as AttentionMetadata expects. Rows of requests the runner dropped are reclaimed
    when the table runs out of rows.

    Last sampled token: `last_token` (on the device) holds, per row, the token its request
    sampled last. Under async scheduling the next step is prepared before that token reaches
    the host: its decode input is a placeholder, replaced on the device from this tensor.

    Staging: every int64 array of a step (and the int32 query_start_loc, viewed inside it) goes
    into one host buffer, copied to the device at once. On CUDA the buffer is pinned and reused:
    before refilling it we wait for the event of the previous copy (normally long done).
    """

    def __init__(self, device: torch.device, num_rows: int = 64, num_cols: int = 16) -> None:
        self.device = device
        self.block_table = np.zeros((num_rows, num_cols), dtype=np.int64)
        self.row_num_blocks = np.zeros(num_rows, dtype=np.int64)  # block ids written per row
        self.row_owner: list[CachedRequestState | None] = [None] * num_rows
        self.free_rows = list(range(num_rows - 1, -1, -1))
        self.last_token = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self._pinned: torch.Tensor | None = None
        self._copy_done: torch.cuda.Event | None = None
        self._copy_pending = False
        self._staged = 0  # elements of the pinned buffer filled for the pending copy

    def block_rows(self, states: list[CachedRequestState],
                   requests: dict[str, CachedRequestState]) -> tuple[np.ndarray, np.ndarray]:
        """(table row, number of blocks) of each state, after writing the block ids each gained
        since the last step."""
        for state in [s for s in states if s.block_table_owner is not self]:
            self._assign_row(state, requests)
        rows = np.fromiter((s.block_table_row for s in states), dtype=np.int64, count=len(states))
        num_blocks = np.fromiter((len(s.block_ids) for s in states), dtype=np.int64, count=len(states))
        for i in np.flatnonzero(self.row_num_blocks[rows] != num_blocks).tolist():
            self._write_new_blocks(states[i])
        return rows, num_blocks

    def _assign_row(self, state: CachedRequestState, requests: dict[str, CachedRequestState]) -> None:
        if not self.free_rows:
            self._reclaim_rows(requests)
        if not self.free_rows:
            self._grow(rows=2 * len(self.row_owner))
        row = self.free_rows.pop()
        self.block_table[row] = 0
        self.row_num_blocks[row] = 0
        self.row_owner[row] = state
        state.block_table_row, state.block_table_owner = row, self

    def _reclaim_rows(self, requests: dict[str, CachedRequestState]) -> None:
        """Free the rows of states the runner no longer holds (finished or preempted requests),
        and of states that have moved to another table since."""
        for row, owner in enumerate(self.row_owner):
            if owner is None:
                continue
            moved = owner.block_table_owner is not self or owner.block_table_row != row
            if moved or requests.get(owner.req_id) is not owner:
                if not moved:
                    owner.block_table_row, owner.block_table_owner = -1, None
                self.row_owner[row] = None
                self.free_rows.append(row)

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        old_rows, old_cols = self.block_table.shape
        rows, cols = max(rows, old_rows), max(cols, old_cols)
        table = np.zeros((rows, cols), dtype=np.int64)
        table[:old_rows, :old_cols] = self.block_table
        self.block_table = table
        self.row_num_blocks = np.concatenate([self.row_num_blocks, np.zeros(rows - old_rows, dtype=np.int64)])
        self.row_owner += [None] * (rows - old_rows)
        if rows > old_rows:
            last_token = torch.zeros(rows, dtype=torch.int64, device=self.device)
            last_token[:old_rows] = self.last_token  # in stream order: after every earlier write
            self.last_token = last_token
        self.free_rows.extend(range(rows - 1, old_rows - 1, -1))  # popped from the end: lowest first

    def _write_new_blocks(self, state: CachedRequestState) -> None:
        row, start, end = state.block_table_row, int(self.row_num_blocks[state.block_table_row]), len(state.block_ids)
        if end > self.block_table.shape[1]:
            self._grow(cols=max(end, 2 * self.block_table.shape[1]))
        self.block_table[row, start:end] = state.block_ids[start:end]
        self.row_num_blocks[row] = end

    def record_sampled(self, table_rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Keep each sampling request's new token on the device, at its block-table row."""
        self.last_token[table_rows] = token_ids

    def staging(self, size: int) -> np.ndarray:
        """A host int64 buffer of `size` elements to fill for this step's single copy."""
        if self.device.type != "cuda":
            return np.empty(size, dtype=np.int64)  # the tensors alias it: a fresh one per step
        if self._copy_pending:
            self._copy_done.synchronize()  # type: ignore[union-attr]
        if self._pinned is None or self._pinned.numel() < size:
            self._pinned = torch.empty(max(size, 2 * (0 if self._pinned is None else self._pinned.numel())),
                                       dtype=torch.int64, pin_memory=True)
        self._staged = size
        return self._pinned.numpy()[:size]

    def to_device(self, staging: np.ndarray, views: list[np.ndarray]) -> list[torch.Tensor]:
        """`views` (consecutive pieces of the filled staging buffer, in order) as device tensors.

        On CUDA: one (asynchronous, pinned) copy of the whole buffer, then device views of the
        same shapes and dtypes. Elsewhere: the numpy views themselves, wrapped without a copy.
        """
        if self.device.type == "cpu":
            return [torch.from_numpy(v) for v in views]
        if self.device.type != "cuda":
            return [torch.from_numpy(v).to(self.device) for v in views]
        # The pinned tensor itself (not a numpy wrapper of its memory), so the copy is async.
        flat = self._pinned[: self._staged].to(self.device, non_blocking=True)  # type: ignore[index]
        if self._copy_done is None:
            self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        self._copy_pending = True
        return split_like(flat, staging, views)


def split_like(flat: torch.Tensor, staging: np.ndarray, views: list[np.ndarray]) -> list[torch.Tensor]:
    """Cut `flat` (int64, the device copy of `staging`) into tensors shaped and typed as `views`,
    pieces of `staging` each starting on an int64 word, found at the same offsets."""
    base = staging.__array_interface__["data"][0]
    out = []
    for view in views:
        start = (view.__array_interface__["data"][0] - base) // 8
        part = flat[start : start + -(-view.nbytes // 8)]  # an int32 piece may end mid-word
        if view.dtype == np.int32:
            part = part.view(torch.int32)[: view.size]
        out.append(part.view(view.shape))
    return out


def _order_decodes_first(scheduled: dict[str, int]) -> tuple[list[str], int]:
    """Request ids with the single-token queries first (stable), and how many those are."""
    decodes = [r for r, n in scheduled.items() if n == 1]
    if len(decodes) == len(scheduled):
        return decodes, len(decodes)
    return decodes + [r for r, n in scheduled.items() if n != 1], len(decodes)


def prepare_inputs(
    scheduler_output: SchedulerOutput,
    requests: dict[str, CachedRequestState],
    block_size: int,
    device: torch.device,
    buffers: InputBuffers | None = None,
) -> BatchInputs:
    """Flatten the scheduled tokens of every request into one batch (decodes first).

    `buffers` (kept by the runner across steps) makes the block tables incremental and the host
    buffer reusable; without it a fresh one is used (same result).
    """
    if buffers is None:
        buffers = InputBuffers(device)
    scheduled = scheduler_output.num_scheduled_tokens
    # Decodes first: the attention backend batches single-token queries together.
    req_ids, num_decodes = _order_decodes_first(scheduled)
    num_reqs = len(req_ids)
    states = [requests[r] for r in req_ids]
    computed = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=num_reqs)
    if num_decodes == num_reqs:  # decode-only (every CUDA-graph step): one token per request
        query_lens = None
        query_start_loc = np.arange(num_reqs + 1, dtype=np.int64)
        token_positions = computed
    else:
        query_lens = np.ones(num_reqs, dtype=np.int64)
        query_lens[num_decodes:] = [scheduled[r] for r in req_ids[num_decodes:]]
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        # Each token's position: its request's first new position + its offset in the request.
        token_positions = np.repeat(computed - query_start_loc[:-1], query_lens) + np.arange(query_start_loc[-1])
    seq_lens = computed + (1 if query_lens is None else query_lens)
    num_tokens = int(query_start_loc[-1])
    num_known = np.fromiter((len(s.token_ids) for s in states), dtype=np.int64, count=num_reqs)
    # A request samples when this step's tokens reach the end of the tokens it knows.
    sampling_rows = np.flatnonzero(seq_lens == num_known)
    rows, num_blocks = buffers.block_rows(states, requests)
    max_blocks = int(num_blocks.max()) if num_reqs else 0

    # Decodes: the input is the token at num_computed_tokens; a placeholder (the token sampled by
    # a step whose output is not fetched yet) is taken from the device's last_token instead.
    decode_tokens = np.fromiter(
        (s.token_ids[s.num_computed_tokens] for s in states[:num_decodes]), dtype=np.int64, count=num_decodes)
    on_device = np.flatnonzero(decode_tokens == PLACEHOLDER_TOKEN_ID)
    # Pipeline stages: the decodes ahead (one-token queries: token i is request i).
    ahead_ids = set(scheduler_output.decode_ahead_req_ids)
    ahead = [i for i, req_id in enumerate(req_ids[:num_decodes]) if req_id in ahead_ids] if ahead_ids else []

    # One int64 host buffer holds every array of the step; the int32 query_start_loc sits in
    # its last int64 elements, viewed as int32.
    sizes = [num_tokens, num_tokens, num_tokens, num_reqs, len(sampling_rows), num_reqs * max_blocks,
             len(sampling_rows), len(on_device), len(on_device), len(ahead), (num_reqs + 2) // 2]
    # Every piece starts on 16 bytes: Triton specialises kernels on pointer alignment, so
    # pieces at arbitrary offsets would compile a new variant for each combination met.
    offsets = [0, *itertools.accumulate(size + (size & 1) for size in sizes)]
    staging = buffers.staging(offsets[-1])
    (input_ids, positions, slot_mapping, seq_lens_out, logits_indices, block_tables, sampling_table_rows,
     device_token_index, device_token_rows, ahead_index, qsl_words) = (
        staging[offsets[i] : offsets[i] + sizes[i]] for i in range(len(sizes)))
    block_tables = block_tables.reshape(num_reqs, max_blocks)

    input_ids[:num_decodes] = decode_tokens
    device_token_index[:] = on_device
    device_token_rows[:] = rows[on_device]
    ahead_index[:] = ahead
    sampling_table_rows[:] = rows[sampling_rows]
    for i in range(num_decodes, num_reqs):  # prefill chunks: a slice of the known tokens each
        state, start, end = states[i], int(query_start_loc[i]), int(query_start_loc[i + 1])
        input_ids[start:end] = state.token_ids[state.num_computed_tokens : state.num_computed_tokens + end - start]
    positions[:] = token_positions
    seq_lens_out[:] = seq_lens
    np.take(buffers.block_table[:, :max_blocks], rows, axis=0, out=block_tables)
    token_rows = np.arange(num_reqs) if query_lens is None else np.repeat(np.arange(num_reqs), query_lens)
    np.add(block_tables[token_rows, positions // block_size] * block_size, positions % block_size, out=slot_mapping)
    # The last token of each sampling request (in a decode-only batch, token i is request i).
    logits_indices[:] = sampling_rows if query_lens is None else query_start_loc[sampling_rows + 1] - 1
    qsl32 = qsl_words.view(np.int32)[: num_reqs + 1]
    qsl32[:] = query_start_loc

    prompt_logprob_spans: dict[str, tuple[int, int, int]] = {}
    for i in [i for i, s in enumerate(states) if s.sampling_params.prompt_logprobs is not None]:
        state, start = states[i], int(query_start_loc[i])
        first = state.num_computed_tokens
        if first < state.num_prompt_tokens - 1:
            # Position p predicts prompt token p + 1; the last prompt position predicts the output.
            rows_needed = min(int(seq_lens[i]), state.num_prompt_tokens - 1) - first
            prompt_logprob_spans[req_ids[i]] = (start, rows_needed, first)

    (input_ids_t, positions_t, slot_mapping_t, seq_lens_t, logits_indices_t, block_tables_t, sampling_table_rows_t,
     device_token_index_t, device_token_rows_t, ahead_index_t, qsl_t) = buffers.to_device(
        staging, [input_ids, positions, slot_mapping, seq_lens_out, logits_indices, block_tables, sampling_table_rows,
                  device_token_index, device_token_rows, ahead_index, qsl32])
    if len(on_device):
        input_ids_t[device_token_index_t] = buffers.last_token[device_token_rows_t]
    seq_lens_cpu = seq_lens.tolist()
    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_decodes=num_decodes,
        query_start_loc=qsl_t,
        seq_lens=seq_lens_t,
        slot_mapping=slot_mapping_t,
        block_tables=block_tables_t,
        max_query_len=(1 if query_lens is None else int(query_lens.max())) if num_reqs else 0,
        max_seq_len=max(seq_lens_cpu, default=0),
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens_cpu,
    )
    return BatchInputs(
        req_ids=req_ids,
        input_ids=input_ids_t,
        positions=positions_t,
        attn_metadata=metadata,
        logits_indices=logits_indices_t,
        sampling_req_ids=[req_ids[i] for i in sampling_rows.tolist()],
        prompt_logprob_spans=prompt_logprob_spans,
        sampling_table_rows=sampling_table_rows_t,
        decode_ahead_index=ahead_index_t if ahead else None,
        logits_rows_are_tokens=len(sampling_rows) == num_tokens,
    )
