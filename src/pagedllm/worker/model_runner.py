"""ModelRunner: keeps per-request state, builds each step's batch, runs the model and samples."""

from __future__ import annotations

import logging

import torch
from torch.profiler import record_function

from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.distributed import (
    broadcast_from_output_rank,
    get_custom_all_reduce,
    get_pp_size,
    is_first_pp_rank,
    is_last_pp_rank,
    recv_from_last_stage,
    recv_from_prev_stage,
    send_to_first_stage,
    send_to_next_stage,
    tensor_model_parallel_all_gather,
)
from pagedllm.layers.custom_op import set_fused_kernels
from pagedllm.layers.moe import MAX_DENSE_GRAPH_TOKENS, FusedMoE
from pagedllm.layers.vocab import ParallelLMHead
from pagedllm.loader import get_model
from pagedllm.models.pipeline import IntermediateTensors, empty_intermediate_tensors
from pagedllm.worker.cuda_graph import CUDAGraphRunner
from pagedllm.worker.input_batch import (
    PLACEHOLDER_TOKEN_ID,
    BatchInputs,
    CachedRequestState,
    InputBuffers,
    prepare_inputs,
)
from pagedllm.worker.logits_processors import apply_logits_processors
from pagedllm.worker.memory_plan import kv_cache_bytes_per_token
from pagedllm.worker.runner_output import LogprobsLists, ModelRunnerOutput
from pagedllm.worker.sampler import Sampler, compute_logprobs
from pagedllm.worker.sampling_metadata import SamplingMetadata, SamplingMetadataCache
from pagedllm.worker.sharded_sampling import VocabShard

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs one step of the model for a SchedulerOutput on one device."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, device: torch.device, seed: int = 0) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.device = device
        self.seed = seed
        self.block_size = cache_config.block_size
        self.dtype = getattr(torch, model_config.dtype)
        # The width of the activations between layers (and between pipeline stages).
        self.hidden_size = int(model_config.hf_config.get("hidden_size") or model_config.hf_config["n_embd"])
        self.requests: dict[str, CachedRequestState] = {}
        # Requests with user logits processors: without any, the per-row processor loop is skipped.
        self.logits_processor_req_ids: set[str] = set()
        # Seeded requests: their generator is re-seeded for every output position (see _sample).
        self.seeded_req_ids: set[str] = set()
        # The fused Triton sampling kernel (CUDA) goes with the other fused kernels.
        self.sampler = Sampler(use_triton=model_config.use_fused_kernels)
        # Host state reused across steps: persistent block table / staging buffer, sampling metadata.
        self.input_buffers = InputBuffers(device)
        self.sampling_metadata_cache = SamplingMetadataCache()
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.cuda_graphs: CUDAGraphRunner | None = None
        self.vocab_size = int(model_config.hf_config.get("vocab_size") or 0)  # the LM head's
        # Tensor parallelism: this rank's slice of the vocabulary, for sampling without gathering
        # the logits (sharded_sampling.py); set by load_model.
        self.vocab_shard: VocabShard | None = None

    def load_model(self) -> None:
        """Build the model and load its weights onto the device."""
        self.model = get_model(self.model_config, self.device, seed=self.seed)
        set_fused_kernels(self.model, self.model_config.use_fused_kernels)
        lm_head = getattr(self.model, "lm_head", None)
        if isinstance(lm_head, ParallelLMHead) and lm_head.tp_size > 1:
            custom = get_custom_all_reduce()
            self.vocab_shard = VocabShard(lm_head.vocab_start, lm_head.num_local_tokens, lm_head.vocab_size,
                                          lambda x: tensor_model_parallel_all_gather(x, dim=0),
                                          exchange=None if custom is None else custom.partials_exchange)
        if self.model_config.use_fused_kernels:
            from pagedllm.layers.linear import prepare_gemv_all_reduce

            sites = prepare_gemv_all_reduce(self.model)
            if sites:
                logger.info("All-reduce carried by the CUDA GEMVs at %d row-parallel layers.", sites)

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one block takes across all layers (keys and values)."""
        return self.block_size * kv_cache_bytes_per_token(self.model.attention_layers(), self.dtype)  # type: ignore[union-attr]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV pool ([2, num_blocks, block_size, Hkv, D] per layer) and bind it."""
        self.kv_caches = []
        for layer in self.model.attention_layers():  # type: ignore[union-attr]
            cache = torch.zeros(2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim,
                                dtype=self.dtype, device=self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    def profile_run(self, num_tokens: int, num_seqs: int) -> int:
        """Run one prefill-only step of `num_tokens` tokens over `num_seqs` requests, to find peak memory.

        Uses a temporary KV cache just large enough for the dummy prompts (freed afterwards);
        returns its size in bytes so the caller can leave it out of the activation peak.
        """
        num_blocks = sum(-(-n // self.block_size) for n in _dummy_prompt_lengths(num_tokens, num_seqs))
        self.initialize_kv_cache(num_blocks)
        self._dummy_prefill(num_tokens, num_seqs, num_blocks)
        for layer in self.model.attention_layers():  # type: ignore[union-attr]
            layer.kv_cache = torch.empty(0)
        self.kv_caches = []
        return num_blocks * self.kv_cache_bytes_per_block()

    @torch.inference_mode()
    def warm_up(self, num_tokens: int, num_seqs: int) -> None:
        """Run what the first requests would otherwise pay for once, before they come.

        Prefill steps of num_tokens, num_tokens / 2, ... tokens through the real KV pool: the
        allocator keeps the largest step's activation buffers (the memory profile emptied its
        cache), and cuBLAS loads the GEMM kernels it picks for each size class (lazily loaded
        on first use: ~5 ms each, which stalled the first prefill steps of a T1 pass). Then the
        LM head at every row count a step can sample (1 .. num_seqs): outside the CUDA graphs,
        each new row count would load its kernel mid-run. The dummy prompts write into blocks no
        request holds yet; their K/V is never read.
        """
        num_blocks = self.kv_caches[0].shape[1]
        tokens = num_tokens
        while tokens >= 64:
            self._dummy_prefill(tokens, num_seqs, num_blocks)
            tokens //= 2
        if not is_last_pp_rank():
            return
        hidden = torch.zeros(num_seqs, self.hidden_size, dtype=self.dtype, device=self.device)
        for rows in range(1, num_seqs + 1):
            self.model.compute_logits(hidden[:rows])  # type: ignore[union-attr]

    def _dummy_prefill(self, num_tokens: int, num_seqs: int, num_blocks: int) -> None:
        """Prefill dummy prompts (token 0) through blocks [0, num_blocks), shared round-robin when fewer."""
        from pagedllm.core.scheduler_output import NewRequestData, SchedulerOutput
        from pagedllm.sampling_params import SamplingParams

        new_reqs, next_block = [], 0
        for i, n in enumerate(_dummy_prompt_lengths(num_tokens, num_seqs)):
            nb = -(-n // self.block_size)
            new_reqs.append(NewRequestData(
                req_id=f"dummy-{i}", prompt_token_ids=[0] * n, output_token_ids=[],
                sampling_params=SamplingParams(temperature=1.0, max_tokens=1),
                block_ids=[(next_block + j) % num_blocks for j in range(nb)], num_computed_tokens=0))
            next_block += nb
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=[],
            num_scheduled_tokens={r.req_id: len(r.prompt_token_ids) for r in new_reqs},
            total_num_scheduled_tokens=num_tokens)
        self.execute_model(output)
        self.requests.clear()

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int, max_prefill_tokens: int = 0) -> None:
        """Capture decode-step CUDA graphs for a ladder of batch sizes, and graphs for steps with
        prefills of up to `max_prefill_tokens` tokens (after the KV cache exists)."""
        from pagedllm.attention import cuda_decode, triton_backend

        layers = self.model.attention_layers()  # type: ignore[union-attr]
        num_kv_heads = layers[0].num_kv_heads
        sms = triton_backend.num_sms(self.device)

        def choose_splits(batch: int, max_len: int) -> int:
            return triton_backend.choose_num_kv_splits(batch, num_kv_heads, max_len, sms)

        def context_bounds(batch: int) -> list[int]:
            # Short contexts take the CUDA decode kernel where it serves a layer: graphs of their own.
            serves = any(cuda_decode.serves_layer(layer.num_heads, layer.num_kv_heads, layer.head_dim, self.dtype,
                                                  self.block_size, layer.sliding_window, layer.logits_soft_cap,
                                                  batch, self.device) for layer in layers)
            return [cuda_decode.MAX_CONTEXT] if serves and cuda_decode.available() else []

        # The LM head runs outside the graphs: tune its skinny GEMM now, not at the first request.
        with torch.inference_mode():
            for num_rows in (1, 2, 16) if is_last_pp_rank() else ():
                self.model.compute_logits(  # type: ignore[union-attr]
                    torch.zeros(num_rows, self.hidden_size, dtype=self.dtype, device=self.device))
        if any(isinstance(module, FusedMoE) for module in self.model.modules()):  # type: ignore[union-attr]
            max_prefill_tokens = min(max_prefill_tokens, MAX_DENSE_GRAPH_TOKENS)  # captured MoE runs dense
        self.cuda_graphs = CUDAGraphRunner(self.model, max_num_seqs, max_model_len, self.block_size,  # type: ignore[arg-type]
                                           self.device, choose_splits, max_prefill_tokens,
                                           intermediate_width=0 if is_first_pp_rank() else self.hidden_size,
                                           context_bounds=context_bounds)
        self.cuda_graphs.capture()

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            self.logits_processor_req_ids.discard(req_id)
            self.seeded_req_ids.discard(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            if params.logits_processors:
                self.logits_processor_req_ids.add(new.req_id)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device)
                self.seeded_req_ids.add(new.req_id)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling_params=params,
                generator=generator,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in scheduler_output.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
            # The decode's input: the request's token at position num_computed_tokens.
            output_index = cached.num_computed_tokens - state.num_prompt_tokens
            if (cached.last_token_id is not None and 0 <= output_index < len(state.output_token_ids)
                    and state.output_token_ids[output_index] == PLACEHOLDER_TOKEN_ID):
                # Pipeline parallelism: a stage that does not sample learns the token here.
                state.resolve_output_token(output_index, cached.last_token_id)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run the scheduled tokens through the model and sample where a request reached its end."""
        return self.execute_model_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> AsyncModelRunnerOutput:
        """Launch the step on the device and return before its sampled tokens reach the host.

        Each sampling request gets a placeholder token until `result()` fetches the step's
        tokens; the next step may be prepared and launched before that (its decode inputs come
        from the device). Logprobs, prompt logprobs and logits processors are read on the host
        during the step itself.
        """
        self._update_states(scheduler_output)
        if scheduler_output.blocks_to_copy:
            self._copy_blocks(scheduler_output.blocks_to_copy)
        if scheduler_output.is_empty:
            return AsyncModelRunnerOutput(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        # The record_function scopes name the stages in profiler traces (LLM.start_profile).
        with record_function("prepare_inputs"):
            batch = prepare_inputs(scheduler_output, self.requests, self.block_size, self.device, self.input_buffers)
            if batch.decode_ahead_index is not None and get_pp_size() > 1:
                self._forward_decode_ahead_tokens(batch)
        with record_function("forward"):
            hidden = self._forward(batch)
        logprobs: dict[str, LogprobsLists] = {}
        request_errors: dict[str, str] = {}
        sampled_ids: torch.Tensor | None = None
        sampling_states: list[CachedRequestState] = []
        if batch.sampling_req_ids:
            sampling_states = [self.requests[r] for r in batch.sampling_req_ids]
            if is_last_pp_rank():
                metadata = self._sampling_metadata(sampling_states)
                shard = self._vocab_shard(metadata)
                with record_function("compute_logits"):
                    # In the model's dtype: the sampler widens to fp32 only for the features that need it.
                    # One sampling row per token (decode steps): no gather kernel to pick the rows.
                    rows = (hidden[: batch.logits_indices.numel()] if batch.logits_rows_are_tokens  # type: ignore[index]
                            else hidden.index_select(0, batch.logits_indices))  # type: ignore[union-attr]
                    logits = self.model.compute_logits(rows, gather=shard is None)  # type: ignore[union-attr]
                if shard is not None:
                    with record_function("sample"):
                        sampled_ids = self.sampler.forward_sharded(logits, metadata, shard).sampled_token_ids
                    # Every rank reduced the same partials to the same tokens: no broadcast.
                    self.input_buffers.record_sampled(batch.sampling_table_rows, sampled_ids)
                else:
                    if self.logits_processor_req_ids:
                        logits = logits.float()
                        # A request whose processor fails is finished by the scheduler; the batch goes on.
                        request_errors = apply_logits_processors(logits, sampling_states)
                    with record_function("sample"):
                        sampled_ids, logprobs = self._sample(sampling_states, metadata, logits)
                    sampled_ids = self._record_sampled(batch, sampled_ids)
            # Each sampled token is a placeholder until it reaches the host (result()), or, on a
            # stage that does not sample, until the scheduler's next step for the request brings
            # it (CachedRequestData.last_token_id), before any step that feeds it.
            for state in sampling_states:
                state.append_output_token(PLACEHOLDER_TOKEN_ID)
        prompt_logprobs = ({} if not batch.prompt_logprob_spans or not is_last_pp_rank()
                           else self._prompt_logprobs(batch, hidden))  # type: ignore[arg-type]
        output = ModelRunnerOutput(
            req_ids=batch.req_ids,
            sampled_token_ids=[[] for _ in batch.req_ids],  # filled by result()
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            request_errors=request_errors,
        )
        return AsyncModelRunnerOutput(output, sampled_ids, sampling_states)

    def _copy_blocks(self, blocks_to_copy: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy K/V blocks src -> dst in every layer before the step writes anything.

        Every source is read before any destination is written (gather, then scatter), so a copy
        may read a block that another copy of the same step writes.
        """
        src = torch.tensor([s for s, _ in blocks_to_copy], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in blocks_to_copy], dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    def _forward_decode_ahead_tokens(self, batch: BatchInputs) -> None:
        """Pipeline stages with async scheduling: a decode ahead's input is a token the last stage
        sampled in a step whose output has not reached the scheduler; the last stage (which has
        it on the device) sends those inputs to the first stage, which embeds them.

        Both ends take the requests from the scheduler's output, so they agree; the last stage
        sends before it waits for this step's activations, so the first stage is not held up."""
        index = batch.decode_ahead_index
        if is_last_pp_rank():
            send_to_first_stage(batch.input_ids.index_select(0, index))
        elif is_first_pp_rank():
            tokens = torch.empty(index.shape, dtype=batch.input_ids.dtype, device=self.device)
            recv_from_last_stage(tokens)
            batch.input_ids[index] = tokens

    def _forward(self, batch: BatchInputs) -> torch.Tensor | IntermediateTensors:
        """This stage's share of the forward pass: the final hidden states on the last pipeline
        stage; elsewhere the activations, which are sent on to the next stage (and returned)."""
        use_graph = self.cuda_graphs is not None and self.cuda_graphs.can_run(batch.attn_metadata)
        intermediate = None
        if not is_first_pp_rank():
            # Straight into the graph's static inputs when a graph runs the step.
            num_tokens = batch.input_ids.shape[0]
            intermediate = (self.cuda_graphs.intermediate_inputs(num_tokens) if use_graph  # type: ignore[union-attr]
                            else empty_intermediate_tensors(self.model.intermediate_keys, num_tokens,  # type: ignore[union-attr]
                                                            self.hidden_size, self.dtype, self.device))
            recv_from_prev_stage(list(intermediate.values()))
        if use_graph:
            hidden = self.cuda_graphs.run(batch.input_ids, batch.positions, batch.attn_metadata)  # type: ignore[union-attr]
        else:
            hidden = self.model(batch.input_ids, batch.positions, batch.attn_metadata, intermediate)  # type: ignore[misc]
        if not is_last_pp_rank():
            send_to_next_stage([hidden[key] for key in self.model.intermediate_keys])  # type: ignore[index, union-attr]
        return hidden

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        """The sampling parameters of this step's sampling rows, on the device."""
        return self.sampling_metadata_cache.get(states, vocab_size=self.vocab_size, device=self.device)

    def _vocab_shard(self, metadata: SamplingMetadata) -> VocabShard | None:
        """This rank's slice of the vocabulary when the step can be sampled from it without
        gathering the logits (tensor parallelism; sharded_sampling.py), else None."""
        shard = self.vocab_shard
        if shard is None or self.logits_processor_req_ids:
            return None
        return shard if self.sampler.sharded_applies(metadata, self.device, shard.col_offset) else None

    def _sample(self, states: list[CachedRequestState], metadata: SamplingMetadata,
                logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, LogprobsLists]]:
        """Sample one token per state (left on the device) and the requested logprobs."""
        if self.seeded_req_ids:
            # A seeded draw depends on the seed and the output position only: not on the batch,
            # nor on whether the request was preempted and recomputed before this position.
            for state in states:
                if state.generator is not None:
                    state.generator.manual_seed(position_seed(state.sampling_params.seed, len(state.output_token_ids)))
        out = self.sampler.forward(logits, metadata)
        logprobs: dict[str, LogprobsLists] = {}
        for row, state in enumerate(states):
            if out.logprobs is not None and state.sampling_params.logprobs is not None:
                k = state.sampling_params.logprobs + 1
                logprobs[state.req_id] = LogprobsLists(
                    token_ids=[out.logprobs.token_ids[row][:k]],
                    logprobs=[out.logprobs.logprobs[row][:k]],
                    ranks=[out.logprobs.ranks[row]],
                )
        return out.sampled_token_ids, logprobs

    def _record_sampled(self, batch: BatchInputs, token_ids: torch.Tensor) -> torch.Tensor:
        """Make every rank of the sampling stage hold the output rank's tokens (the next step's
        decode inputs, on the device)."""
        # Every tensor-parallel rank samples from the same gathered logits; the output rank's
        # tokens are broadcast anyway so that no two ranks' request states can drift apart.
        token_ids = broadcast_from_output_rank(token_ids)
        self.input_buffers.record_sampled(batch.sampling_table_rows, token_ids)
        return token_ids

    def _prompt_logprobs(self, batch: BatchInputs, hidden: torch.Tensor) -> dict[str, LogprobsLists]:
        result: dict[str, LogprobsLists] = {}
        for req_id, (start, rows, first_pos) in batch.prompt_logprob_spans.items():
            state = self.requests[req_id]
            logits = self.model.compute_logits(hidden[start : start + rows]).float()  # type: ignore[union-attr]
            next_tokens = torch.tensor(state.prompt_token_ids[first_pos + 1 : first_pos + 1 + rows], device=self.device)
            lp = torch.log_softmax(logits, dim=-1)
            result[req_id] = compute_logprobs(lp, state.sampling_params.prompt_logprobs or 0, next_tokens)
        return result


def _dummy_prompt_lengths(num_tokens: int, num_seqs: int) -> list[int]:
    """Lengths of the dummy prompts when `num_tokens` tokens are split over (at most) `num_seqs` requests."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    return [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]


def position_seed(seed: int, output_index: int) -> int:
    """The generator seed of a seeded request's draw at output position `output_index`."""
    return (seed * 0x9E3779B97F4A7C15 + output_index * 0xBF58476D1CE4E5B9) % (1 << 63)


class AsyncModelRunnerOutput:
    """A launched step's output, whose sampled tokens are still on their way to the host.

    The tokens are copied device -> pinned host memory without blocking; `result()` waits for
    that copy, puts each token in place of its request's placeholder and returns the
    ModelRunnerOutput. Results must be fetched in step order: a later step's placeholder
    stands after an earlier one's in the same request.
    """

    def __init__(self, output: ModelRunnerOutput, sampled_ids: torch.Tensor | None = None,
                 sampling_states: list[CachedRequestState] | None = None) -> None:
        self._output = output
        self._states = sampling_states or []
        # Output position of each state's placeholder (its last token right now).
        self._output_index = [len(state.output_token_ids) - 1 for state in self._states]
        self._host_ids: torch.Tensor | None = None
        self._copy_done: torch.cuda.Event | None = None
        if sampled_ids is not None and sampled_ids.is_cuda:
            self._host_ids = torch.empty(sampled_ids.shape, dtype=sampled_ids.dtype, pin_memory=True)
            self._host_ids.copy_(sampled_ids, non_blocking=True)
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()
        elif sampled_ids is not None:
            self._host_ids = sampled_ids
        self._resolved = sampled_ids is None

    def result(self) -> ModelRunnerOutput:
        """Wait for the sampled tokens; the step's output (placeholders resolved, once)."""
        if not self._resolved:
            if self._copy_done is not None:
                self._copy_done.synchronize()
            token_ids = self._host_ids.tolist()  # type: ignore[union-attr]
            sampled = {}
            for state, index, token_id in zip(self._states, self._output_index, token_ids):
                state.resolve_output_token(index, token_id)
                sampled[state.req_id] = [token_id]
            self._output.sampled_token_ids = [sampled.get(r, []) for r in self._output.req_ids]
            self._resolved = True
        return self._output
