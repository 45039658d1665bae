"""Worker: one device's model runner, plus sizing of its share of the KV pool."""

from __future__ import annotations

import logging
import os

import torch

from pagedllm.config import DEFAULT_KV_CACHE_MEMORY_BYTES, EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.distributed import destroy_distributed_environment, init_distributed_environment
from pagedllm.layers.linear import set_skinny_gemm
from pagedllm.worker.model_runner import AsyncModelRunnerOutput, ModelRunner
from pagedllm.worker.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)

# Where start_profile / stop_profile write their traces (vLLM: VLLM_TORCH_PROFILER_DIR).
PROFILER_DIR_ENV = "PAGEDLLM_TORCH_PROFILER_DIR"
# "1": trace the device only (kernels, copies, CUDA runtime calls), not the host's torch ops, whose
# recording slows the host enough to turn a device-bound decode step host-bound.
PROFILER_DEVICE_ONLY_ENV = "PAGEDLLM_TORCH_PROFILER_DEVICE_ONLY"


def profiler_activities(device_type: str) -> list[torch.profiler.ProfilerActivity]:
    """What the profiler records on a device of `device_type`: the host's torch ops, plus the
    CUDA kernels on a GPU -- or the CUDA side alone when PAGEDLLM_TORCH_PROFILER_DEVICE_ONLY=1."""
    if device_type != "cuda":
        return [torch.profiler.ProfilerActivity.CPU]
    if os.environ.get(PROFILER_DEVICE_ONLY_ENV, "0") == "1":
        return [torch.profiler.ProfilerActivity.CUDA]
    return [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]


class Worker:
    """Owns a device and its ModelRunner; the executor drives it.

    With tensor or pipeline parallelism there is one Worker per rank, each in its own process: it
    joins the process group before the model is built (layers read their rank and the group size
    then), and holds its rank's shard of the weights and of the KV heads of its stage's layers.
    """

    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: str | None = None) -> None:
        self.config = config
        self.rank = rank
        self._profiler: torch.profiler.profile | None = None
        self._profile_dir = ""  # where the running profiler's trace goes
        self._num_traces = 0
        world_size = config.parallel_config.world_size
        if config.device == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if world_size > 1:
            if distributed_init_method is None:
                raise ValueError("A parallel worker needs a distributed_init_method (tcp://host:port).")
            init_distributed_environment(rank, world_size, distributed_init_method, self.device,
                                         custom_all_reduce=not config.parallel_config.disable_custom_all_reduce,
                                         pipeline_parallel_size=config.parallel_config.pipeline_parallel_size)
        torch.manual_seed(config.seed)
        self.model_runner = ModelRunner(config.model_config, config.cache_config, self.device, seed=config.seed)

    def load_model(self) -> None:
        """Load the model's weights onto this worker's device."""
        self.model_runner.load_model()

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the memory given to the cache (or the pinned override)."""
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if cache.kv_cache_memory_bytes is not None or self.device.type != "cuda":
            budget = cache.kv_cache_memory_bytes or DEFAULT_KV_CACHE_MEMORY_BYTES
        else:
            budget = self._profile_kv_cache_budget()
        return max(budget // self.model_runner.kv_cache_bytes_per_block(), 0)

    def _profile_kv_cache_budget(self) -> int:
        """Bytes left for the KV cache: total x gpu_memory_utilization minus weights, other
        processes' and non-torch memory, and the activation peak of one full-budget forward pass."""
        sched = self.config.scheduler_config
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline_allocated = torch.cuda.memory_allocated(self.device)
        temporary_cache = self.model_runner.profile_run(sched.max_step_tokens, sched.max_num_seqs)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - baseline_allocated - temporary_cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Everything in use now (weights, CUDA context, other processes), plus the transient peak.
        in_use = total - free
        budget = int(total * self.config.cache_config.gpu_memory_utilization) - in_use - activation_peak
        logger.info("Memory profile: total %.2f GiB, in use %.2f GiB, activation peak %.2f GiB, KV budget %.2f GiB",
                    total / 2**30, in_use / 2**30, activation_peak / 2**30, budget / 2**30)
        return max(budget, 0)

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV pool on the device, then capture CUDA graphs unless --enforce-eager."""
        self.model_runner.initialize_kv_cache(num_blocks)
        if self.config.enforce_eager:
            set_skinny_gemm(self.model_runner.model, False)  # type: ignore[arg-type]
        if self.device.type == "cuda":
            sched = self.config.scheduler_config
            if not self.config.enforce_eager:
                self.model_runner.capture_cuda_graphs(sched.max_num_seqs, sched.max_model_len,
                                                      self.config.cuda_graph_max_prefill_tokens)
            self.model_runner.warm_up(sched.max_step_tokens, sched.max_num_seqs)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one scheduled step."""
        return self.model_runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> AsyncModelRunnerOutput:
        """Launch one scheduled step; its sampled tokens are fetched by `result()`."""
        return self.model_runner.execute_model_async(scheduler_output)

    def start_profile(self) -> None:
        """Start the torch profiler (CPU, and CUDA kernels on a GPU) in this rank's process.

        With PAGEDLLM_TORCH_PROFILER_DEVICE_ONLY=1 on a GPU only the device side is traced (the
        host's torch ops are not recorded, so the host keeps its real speed).

        The trace goes to the directory named by PAGEDLLM_TORCH_PROFILER_DIR (vLLM's
        VLLM_TORCH_PROFILER_DIR); without it there is nowhere to write, so this refuses.
        """
        directory = os.environ.get(PROFILER_DIR_ENV)
        if not directory:
            raise RuntimeError(f"Set {PROFILER_DIR_ENV} to a directory for the traces before profiling.")
        if self._profiler is not None:
            raise RuntimeError("The profiler is already running; call stop_profile first.")
        os.makedirs(directory, exist_ok=True)
        self._profile_dir = directory
        self._profiler = torch.profiler.profile(activities=profiler_activities(self.device.type))
        self._profiler.start()

    def stop_profile(self) -> str:
        """Stop the profiler once the device is idle; the path of the Chrome trace written."""
        if self._profiler is None:
            raise RuntimeError("The profiler is not running; call start_profile first.")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        self._num_traces += 1
        path = os.path.join(self._profile_dir, f"trace_rank{self.rank}_{os.getpid()}_{self._num_traces}.json")
        profiler.export_chrome_trace(path)
        logger.info("Profiler trace written to %s", path)
        return path

    def shutdown(self) -> None:
        """Leave the process group (tensor parallelism)."""
        if self.config.parallel_config.world_size > 1:
            destroy_distributed_environment()
