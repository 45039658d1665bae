"""EngineCore: the step loop — schedule -> execute -> update — over the KV pool it sizes."""

from __future__ import annotations

import gc
import logging
import weakref
from collections import deque

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import EngineCoreOutput, SchedulerOutput
from pagedllm.executor.abstract import Executor, StepFuture
from pagedllm.models.sliding_window import kv_cache_sliding_window
from pagedllm.request import Request, RequestStatus

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (modules, model, configs) out of the garbage
    collector's reach: a full collection then walks only what serving allocates, instead of
    pausing the step loop (and with it the GPU) over the ~0.5M objects of the imported libraries
    (one such collection took 249 ms in the middle of a T1 pass on an H200).
    `EngineCore.shutdown` gives them back."""
    gc.collect()
    gc.freeze()


class EngineCore:
    """Owns the scheduler, the KV cache manager and the executor; runs one step at a time.

    With async scheduling (`--async-scheduling`, the default on CUDA) a step is pipelined: it
    schedules and launches step N+1, then waits for step N's sampled tokens and applies them,
    so the host's scheduling, input preparation and output processing run while the device
    computes. The scheduler hands step N+1 the tokens of step N as placeholders and the runner
    feeds them on the device. When an unfinished request needs its previous tokens' values on
    the host (penalties, logits processors), steps run one at a time until it is gone.

    With pipeline micro-batching (`max_concurrent_batches` = the number of pipeline stages) up to
    that many steps are in flight, each of requests whose tokens are all known (the scheduler
    splits the running requests between them): while the last stage runs step N, the first runs
    step N+1 of other requests. The engine applies the oldest step's tokens once the pipe is full.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = Executor.create(config)
        # Worker processes (tensor parallelism) must not outlive an engine that is dropped unclosed.
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        cache, sched = config.cache_config, config.scheduler_config
        num_blocks = self.executor.determine_num_blocks()
        blocks_for_one_request = -(-sched.max_model_len // cache.block_size)
        if num_blocks < blocks_for_one_request:
            raise ValueError(
                f"The KV cache holds {num_blocks} blocks of {cache.block_size} tokens, but one request of "
                f"max_model_len={sched.max_model_len} tokens needs {blocks_for_one_request}. Give the cache "
                f"more memory (--kv-cache-memory-bytes / --gpu-memory-utilization / "
                f"--num-gpu-blocks-override) or lower --max-model-len."
            )
        cache.num_blocks = num_blocks
        self.executor.initialize_cache(num_blocks)
        # When every layer slides (Mistral), blocks behind the window go back to the pool early.
        self.kv_cache_manager = KVCacheManager(num_blocks, cache.block_size, sched.max_model_len,
                                               enable_caching=cache.enable_prefix_caching,
                                               sliding_window=kv_cache_sliding_window(config.model_config.hf_config))
        self.scheduler = Scheduler(sched, self.kv_cache_manager)
        # Steps launched and not yet applied, oldest first: one per pipeline stage (micro-batches),
        # at least two with async scheduling (the next is scheduled while one runs), else one.
        self.max_in_flight = max(sched.max_concurrent_batches, 2 if sched.async_scheduling else 1)
        self._in_flight: deque[tuple[SchedulerOutput, StepFuture]] = deque()
        # Steps launched while the previous one was still in flight (what async scheduling overlaps).
        self.num_pipelined_steps = 0
        num_tokens = num_blocks * cache.block_size
        logger.info("KV cache: %d tokens (%d blocks), max concurrency %.2fx at max_model_len %d",
                    num_tokens, num_blocks, num_tokens / sched.max_model_len, sched.max_model_len)
        freeze_startup_objects()

    def add_request(self, request: Request) -> None:
        """Queue a validated request."""
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish requests early (client abort, stop string); their blocks are freed."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests_stopped(self, request_ids: list[str]) -> None:
        """Finish requests that hit a stop string found after detokenization."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running, or a launched step is not applied yet."""
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, run the model once, and return what each request produced.

        With async scheduling the outputs returned are those of the step launched by the
        previous call (none on the first call), while the step launched now runs.
        """
        if self.max_in_flight > 1:
            return self._step_pipelined()
        if not self.scheduler.has_unfinished_requests():
            return []
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Launch the next step (if there is work and it may run ahead), then apply the oldest
        launched step once `max_in_flight` are launched or nothing new could be."""
        launched = False
        if (self.scheduler.has_unfinished_requests() and len(self._in_flight) < self.max_in_flight
                and (not self._in_flight or self.scheduler.can_schedule_ahead())):
            scheduler_output = self.scheduler.schedule()
            # An empty step is sent only if the runners must hear of finished requests, or if
            # nothing else is in flight (as a synchronous step would be).
            if not scheduler_output.is_empty or scheduler_output.finished_req_ids or not self._in_flight:
                self.num_pipelined_steps += bool(self._in_flight)
                self._in_flight.append((scheduler_output, self.executor.execute_model_async(scheduler_output)))
                launched = not scheduler_output.is_empty
        if not self._in_flight or (launched and len(self._in_flight) < self.max_in_flight):
            return []
        scheduler_output, future = self._in_flight.popleft()
        return self.scheduler.update_from_output(scheduler_output, future.result())

    def start_profile(self) -> None:
        """Start the torch profiler on every worker rank (PAGEDLLM_TORCH_PROFILER_DIR)."""
        self.executor.collective_rpc("start_profile")

    def stop_profile(self) -> list[str]:
        """Stop the profiler on every rank (after the launched steps finish); trace paths by rank."""
        return [str(path) for path in self.executor.collective_rpc("stop_profile")]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; False (nothing changed) while requests hold blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    def check_health(self) -> None:
        """Raise if a worker rank is gone (WorkerDiedError names it)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Release the executor (stops tensor-parallel workers); safe to call twice.

        Also hands the frozen start-up objects back to the garbage collector. On a GPU it then
        collects (whatever of an in-process worker sits in reference cycles) and returns the
        CUDA caching allocator's free memory to the device: another engine started in this
        process (or a worker process on the same GPU) sizes its KV cache from what is free.
        """
        if self._finalizer.alive:
            self._finalizer()
            gc.unfreeze()
            if torch.cuda.is_initialized():  # (a full collection costs ~0.2 s: only where it frees a device)
                gc.collect()
                torch.cuda.empty_cache()
