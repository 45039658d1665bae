"""The executor interface: how the engine core drives its workers, whatever runs them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.worker.runner_output import ModelRunnerOutput


class WorkerDiedError(RuntimeError):
    """A worker rank is gone or failed; the engine cannot step any more."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"Worker rank {rank} failed: {detail}")
        self.rank = rank


class StepFuture(Protocol):
    """A launched step: `result()` waits for it and returns the output rank's output (once)."""

    def result(self) -> ModelRunnerOutput:
        """Wait for the step; its output."""
        ...


@dataclass
class DoneStep:
    """A step that already ran to completion."""

    output: ModelRunnerOutput

    def result(self) -> ModelRunnerOutput:
        """The output, at once."""
        return self.output


class Executor(ABC):
    """Runs every rank's Worker: one step on all ranks, the output rank's sampled tokens back
    (rank 0 with tensor parallelism alone; the first rank of the last pipeline stage).

    `create()` picks the implementation named by --distributed-executor-backend.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @staticmethod
    def create(config: EngineConfig) -> "Executor":
        """The executor for `config.parallel_config.distributed_executor_backend`."""
        backend = config.parallel_config.distributed_executor_backend
        if backend == "uni":
            from pagedllm.executor.uniproc import UniProcExecutor

            return UniProcExecutor(config)
        if backend == "mp":
            from pagedllm.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config)
        if backend == "ray":
            from pagedllm.executor.ray_executor import RayExecutor

            return RayExecutor(config)
        raise ValueError(f"Unknown distributed executor backend {backend!r} (uni, mp or ray).")

    @abstractmethod
    def collective_rpc(self, method: str, *args: object) -> list[object]:
        """Call `Worker.<method>(*args)` on every rank; the results in rank order."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank and return the output rank's (`ParallelConfig.output_rank`)."""

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        """Launch one step and return at once where the backend allows it (async scheduling);
        by default the step runs to completion first."""
        return DoneStep(self.execute_model(scheduler_output))

    def determine_num_blocks(self) -> int:
        """Blocks of the KV pool: the smallest number any rank can hold (every rank holds every block)."""
        return min(int(n) for n in self.collective_rpc("determine_num_blocks"))  # type: ignore[call-overload]

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the pool (this rank's KV heads) on every worker; capture CUDA graphs."""
        self.collective_rpc("initialize_cache", num_blocks)

    def check_health(self) -> None:
        """Raise WorkerDiedError if a rank is gone (a no-op where ranks share this process)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every worker; safe to call twice."""
