"""The single-process executor: one worker in the engine's own process."""

from __future__ import annotations

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.executor.abstract import Executor, StepFuture
from pagedllm.worker.runner_output import ModelRunnerOutput
from pagedllm.worker.worker import Worker


class UniProcExecutor(Executor):
    """Runs the model in this process (one rank: the default for one device)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._worker: Worker | None = Worker(config)
        self._worker.load_model()

    @property
    def worker(self) -> Worker:
        """The one worker (gone after shutdown)."""
        if self._worker is None:
            raise RuntimeError("The executor has been shut down.")
        return self._worker

    def collective_rpc(self, method: str, *args: object) -> list[object]:
        """Call the one worker directly."""
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return the sampled tokens."""
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        """Launch one step on the device; the sampled tokens are fetched by `result()`."""
        return self.worker.execute_model_async(scheduler_output)

    def shutdown(self) -> None:
        """Drop the worker: its model, KV cache and CUDA graphs go with it (EngineCore.shutdown
        then hands the device memory back), as worker processes do when they exit."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown()
