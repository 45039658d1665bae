"""prepare_inputs with persistent InputBuffers equals the plain per-request construction, step
after step, while requests join, finish, get preempted (re-added under the same id) and grow."""

from __future__ import annotations

import random

import numpy as np
import torch

from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import CachedRequestState, InputBuffers, prepare_inputs, split_like

CPU = torch.device("cpu")
BLOCK_SIZE = 4


def reference_inputs(scheduled: dict[str, int], requests: dict[str, CachedRequestState]) -> dict:
    """The batch built request by request, as the runner did before InputBuffers (the spec)."""
    req_ids = sorted(scheduled, key=lambda r: scheduled[r] != 1)
    input_ids, positions, slots, seq_lens, logits_indices, sampling, spans = [], [], [], [], [], [], {}
    qsl = [0]
    max_blocks = max(len(requests[r].block_ids) for r in req_ids)
    tables = np.zeros((len(req_ids), max_blocks), dtype=np.int64)
    for i, req_id in enumerate(req_ids):
        state, n = requests[req_id], scheduled[req_id]
        start, computed = qsl[-1], state.num_computed_tokens
        end = computed + n
        input_ids += state.token_ids[computed:end]
        positions += list(range(computed, end))
        slots += [state.block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(computed, end)]
        seq_lens.append(end)
        tables[i, : len(state.block_ids)] = state.block_ids
        qsl.append(start + n)
        if end == len(state.token_ids):
            logits_indices.append(start + n - 1)
            sampling.append(req_id)
        if state.sampling_params.prompt_logprobs is not None and computed < state.num_prompt_tokens - 1:
            spans[req_id] = (start, min(end, state.num_prompt_tokens - 1) - computed, computed)
    return dict(req_ids=req_ids, input_ids=input_ids, positions=positions, slot_mapping=slots, seq_lens=seq_lens,
                query_start_loc=qsl, block_tables=tables.tolist(), logits_indices=logits_indices,
                sampling_req_ids=sampling, prompt_logprob_spans=spans, num_decodes=sum(scheduled[r] == 1 for r in req_ids))


def as_dict(batch) -> dict:
    md = batch.attn_metadata
    assert md.query_start_loc.dtype == torch.int32 and md.block_tables.dtype == torch.int64
    assert md.query_start_loc_cpu == md.query_start_loc.tolist() and md.seq_lens_cpu == md.seq_lens.tolist()
    return dict(req_ids=batch.req_ids, input_ids=batch.input_ids.tolist(), positions=batch.positions.tolist(),
                slot_mapping=md.slot_mapping.tolist(), seq_lens=md.seq_lens.tolist(),
                query_start_loc=md.query_start_loc.tolist(), block_tables=md.block_tables.tolist(),
                logits_indices=batch.logits_indices.tolist(), sampling_req_ids=batch.sampling_req_ids,
                prompt_logprob_spans=batch.prompt_logprob_spans, num_decodes=md.num_decodes)


class Workload:
    """Random requests driven like the scheduler drives the runner (chunked prefill, then decodes)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.requests: dict[str, CachedRequestState] = {}
        self.next_id = 0
        self.next_block = 1

    def new_state(self, req_id: str) -> CachedRequestState:
        prompt = [self.rng.randrange(1000) for _ in range(self.rng.randrange(1, 40))]
        params = SamplingParams(prompt_logprobs=self.rng.choice([None, 0, 2]))
        return CachedRequestState(req_id, prompt, [], params, None, [], num_computed_tokens=0)

    def schedule(self) -> dict[str, int]:
        """Drop / preempt / add requests, then pick this step's tokens and hand out blocks."""
        for req_id in list(self.requests):
            roll = self.rng.random()
            if roll < 0.08:
                del self.requests[req_id]  # finished
            elif roll < 0.12:
                self.requests[req_id] = self.new_state(req_id)  # preempted and resumed: a new state
        for _ in range(self.rng.randrange(0, 6)):
            self.requests[f"r{self.next_id}"] = self.new_state(f"r{self.next_id}")
            self.next_id += 1
        scheduled = {}
        for req_id, state in self.requests.items():
            if self.rng.random() < 0.15:
                continue  # not scheduled this step (out of budget)
            left = len(state.token_ids) - state.num_computed_tokens
            n = min(left, self.rng.choice([1, 3, 16, 64]))
            scheduled[req_id] = n
            while len(state.block_ids) * BLOCK_SIZE < state.num_computed_tokens + n:
                state.block_ids.append(self.next_block)
                self.next_block += 1
        return scheduled

    def finish_step(self, scheduled: dict[str, int], sampling: list[str]) -> None:
        for req_id, n in scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        for req_id in sampling:
            self.requests[req_id].append_output_token(self.rng.randrange(1000))


def test_persistent_buffers_match_the_reference_through_churn_and_growth() -> None:
    workload = Workload(seed=0)
    buffers = InputBuffers(CPU, num_rows=2, num_cols=1)  # tiny: rows and columns must grow
    other = InputBuffers(CPU, num_rows=1, num_cols=1)
    for _ in range(60):
        scheduled = workload.schedule()
        if not scheduled:
            continue
        output = SchedulerOutput([], [], scheduled, sum(scheduled.values()))
        expected = reference_inputs(scheduled, workload.requests)
        batch = prepare_inputs(output, workload.requests, BLOCK_SIZE, CPU, buffers)
        assert as_dict(batch) == expected
        # Without buffers (a fresh table), and with a second table the states move to and back from.
        assert as_dict(prepare_inputs(output, workload.requests, BLOCK_SIZE, CPU)) == expected
        assert as_dict(prepare_inputs(output, workload.requests, BLOCK_SIZE, CPU, other)) == expected
        workload.finish_step(scheduled, batch.sampling_req_ids)
    assert 8 <= buffers.block_table.shape[0] <= 64 and buffers.block_table.shape[1] > 1  # grown, rows reclaimed


def test_rows_of_dropped_requests_are_reclaimed_and_handed_out_zeroed() -> None:
    buffers = InputBuffers(CPU, num_rows=2, num_cols=4)
    requests: dict[str, CachedRequestState] = {}
    for i, blocks in enumerate([[5, 6, 7], [8]]):
        requests[f"r{i}"] = CachedRequestState(f"r{i}", [1] * 10, [], SamplingParams(), None, blocks, 0)
    rows, _ = buffers.block_rows(list(requests.values()), requests)
    assert sorted(rows.tolist()) == [0, 1]
    old = requests.pop("r0")
    requests["r2"] = CachedRequestState("r2", [1], [], SamplingParams(), None, [9], 0)
    (row,), (num_blocks,) = buffers.block_rows([requests["r2"]], requests)
    assert old.block_table_row == -1 and old.block_table_owner is None and row != requests["r1"].block_table_row
    assert buffers.block_table[row].tolist() == [9, 0, 0, 0] and num_blocks == 1
    assert buffers.block_table.shape[0] == 2  # reclaimed, not grown


def test_split_like_recovers_every_piece_of_the_staging_buffer() -> None:
    # The CUDA path copies the whole buffer and cuts the device copy like this (odd and even
    # request counts: query_start_loc's int32 words may end mid-word).
    for num_reqs in (1, 2, 5):
        staging = np.arange(3 + 2 * num_reqs + (num_reqs + 2) // 2, dtype=np.int64)
        tokens, table = staging[:3], staging[3 : 3 + 2 * num_reqs].reshape(num_reqs, 2)
        qsl = staging[3 + 2 * num_reqs :].view(np.int32)[: num_reqs + 1]
        qsl[:] = np.arange(num_reqs + 1) * 7
        parts = split_like(torch.from_numpy(staging.copy()), staging, [tokens, table, qsl])
        assert [p.dtype for p in parts] == [torch.int64, torch.int64, torch.int32]
        assert all(p.tolist() == v.tolist() for p, v in zip(parts, [tokens, table, qsl]))


def test_every_piece_of_a_step_starts_on_16_bytes() -> None:
    # Triton specialises kernels on pointer alignment: pieces at odd int64 offsets would make
    # steps compile new kernel variants at random.
    buffers = InputBuffers(torch.device("cpu"))
    seen = []
    original = buffers.to_device

    def record(staging, views):
        seen.extend((v.__array_interface__["data"][0] - staging.__array_interface__["data"][0]) for v in views)
        return original(staging, views)

    buffers.to_device = record  # type: ignore[method-assign]
    requests = {f"r{i}": CachedRequestState(f"r{i}", list(range(3 + i)), [], SamplingParams(), None,
                                            [i], 0) for i in range(3)}
    out = SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=[],
                          num_scheduled_tokens={"r0": 3, "r1": 4, "r2": 5}, total_num_scheduled_tokens=12)
    prepare_inputs(out, requests, 16, torch.device("cpu"), buffers)
    assert seen and all(offset % 16 == 0 for offset in seen)
