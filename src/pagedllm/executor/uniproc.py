"""The single-process executor: one worker in the engine's own process."""

from __future__ import annotations

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.worker.runner_output import ModelRunnerOutput
from pagedllm.worker.worker import Worker


class UniProcExecutor:
    """Runs the model in this process (the default for one device)."""

    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        """Blocks the KV pool can have."""
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the pool on every worker."""
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return the sampled tokens."""
        return self.worker.execute_model(scheduler_output)

    def shutdown(self) -> None:
        """Nothing to stop in-process."""
