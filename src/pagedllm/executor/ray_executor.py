"""The Ray executor: one Ray actor per rank (tensor x pipeline), placed by a placement group.

Joins the Ray cluster named by RAY_ADDRESS (a cluster started with `ray start`, possibly many
machines) or starts a local one. A placement group reserves one bundle per rank (a GPU, or a CPU
on CPU-only clusters) before any actor starts, so ranks are placed all-or-nothing. Ranks are
then numbered node by node (`ranks_by_node`), so a tensor-parallel group stays on one machine
where it fits and only pipeline stages cross machines. Rank 0's actor hosts the process group's
store. Each step the scheduler output is put in the object store
once and every actor reads the same object; only the output rank's answer is used (rank 0, or
the first rank of the last pipeline stage).

A dead actor (process killed, node lost) surfaces as a Ray error on its result, which becomes a
WorkerDiedError naming the rank; results are awaited one at a time as they complete, so a rank
stuck in a collective behind a dead peer never blocks the report.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.executor.abstract import Executor, StepFuture, WorkerDiedError
from pagedllm.worker.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)


class RayWorkerWrapper:
    """The actor body: builds this rank's Worker on request and forwards calls to it."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.store: Any = None  # rank 0's actor: the group's store (host_store)

    def host_store(self) -> tuple[str, int]:
        """Serve the group's store from this actor (rank 0's) for its whole life; its address."""
        import ray

        from pagedllm.distributed import host_store

        ip = ray.util.get_node_ip_address()
        self.store = host_store(ip)
        return ip, self.store.port

    def init_worker(self, config: EngineConfig, rank: int, init_method: str) -> None:
        """Join the process group and load this rank's weights (Ray set CUDA_VISIBLE_DEVICES to one GPU)."""
        import torch

        from pagedllm.worker.worker import Worker

        if config.device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("PAGEDLLM_RAY_CPU_THREADS", "1"))))
        self.worker = Worker(config, rank=rank, local_rank=0, distributed_init_method=init_method)
        self.worker.load_model()

    def execute_method(self, method: str, *args: Any) -> Any:
        """Call `Worker.<method>(*args)`."""
        return getattr(self.worker, method)(*args)

    def pid(self) -> int:
        """The actor's process id (tests kill it to check failure handling)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


def ranks_by_node(node_ids: list[str]) -> list[int]:
    """The order in which actors (on `node_ids[i]`) become ranks 0, 1, ...: each node's actors
    consecutive, nodes in the order of their first actor. A tensor-parallel group (consecutive
    ranks) then stays on one node wherever the node holds that many ranks, and only pipeline
    stages, which exchange one activation per step, cross between machines."""
    first_seen = {node: i for i, node in reversed(list(enumerate(node_ids)))}
    return sorted(range(len(node_ids)), key=lambda i: (first_seen[node_ids[i]], i))


def tensor_parallel_groups_span_nodes(node_of_rank: list[str], tensor_parallel_size: int) -> bool:
    """Whether any tensor-parallel group (consecutive ranks) has ranks on two nodes."""
    groups = [node_of_rank[start:start + tensor_parallel_size]
              for start in range(0, len(node_of_rank), tensor_parallel_size)]
    return any(len(set(group)) > 1 for group in groups)


class RayExecutor(Executor):
    """Tensor / pipeline parallelism over Ray actors, one per rank, possibly on different machines."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ImportError("--distributed-executor-backend ray needs the `ray` package (pip install ray).") from e
        self.ray = ray
        self.world_size = config.parallel_config.world_size
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=True)
        resource = {"GPU": 1, "CPU": 1} if config.device == "cuda" else {"CPU": 1}
        self.placement_group = placement_group([resource] * self.world_size, strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=120)
        if not ready:
            ray.util.remove_placement_group(self.placement_group)
            raise RuntimeError(f"The Ray cluster cannot place {self.world_size} bundles of {resource} "
                               f"(cluster resources: {ray.cluster_resources()}).")
        actor_cls = ray.remote(RayWorkerWrapper)
        actors = [
            actor_cls.options(
                num_cpus=resource["CPU"], num_gpus=resource.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=bundle),
            ).remote()
            for bundle in range(self.world_size)
        ]
        self._closed = False
        self.workers = actors  # in bundle order until each actor's node is known
        node_ids = self._gather([actor.node_id.remote() for actor in actors])
        order = ranks_by_node(node_ids)
        self.workers = [actors[i] for i in order]
        self.node_of_rank = [node_ids[i] for i in order]
        tp = config.parallel_config.tensor_parallel_size
        if tensor_parallel_groups_span_nodes(self.node_of_rank, tp):
            logger.warning("A tensor-parallel group of %d ranks spans Ray nodes (ranks per node: %s): its "
                           "all-reduces cross machines; prefer a tensor-parallel size that each node holds "
                           "and pipeline stages across nodes.", tp, self.node_of_rank)
        ip, port = self._gather([self.workers[0].host_store.remote()])[0]
        init_method = f"tcp://{ip}:{port}"
        self._gather([w.init_worker.remote(config, rank, init_method) for rank, w in enumerate(self.workers)])

    def collective_rpc(self, method: str, *args: object) -> list[object]:
        """Call `Worker.<method>` on every rank (arguments put in the object store once)."""
        refs = [self.ray.put(a) for a in args]
        return self._gather([w.execute_method.remote(method, *refs) for w in self.workers])

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run the step on every rank; the output rank's output."""
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        """Submit the step to every actor (each runs its calls in order); the future gathers them."""
        ref = self.ray.put(scheduler_output)
        refs = [w.execute_method.remote("execute_model", ref) for w in self.workers]
        return _RayStep(self, refs)

    def check_health(self) -> None:
        """Ping every actor; a dead one raises WorkerDiedError."""
        self.worker_pids()

    def worker_pids(self) -> list[int]:
        """Process id of each rank's actor."""
        return self._gather([w.pid.remote() for w in self.workers])  # type: ignore[return-value]

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        if self._closed:
            return
        self._closed = True
        for worker in reversed(self.workers):  # rank 0, which hosts the group's store, last
            try:
                self.ray.kill(worker)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            self.ray.util.remove_placement_group(self.placement_group)
        except Exception:  # noqa: BLE001
            pass

    def _blame(self, rank: int, error: Exception, pending: list[Any], rank_of: dict[Any, int],
               grace_s: float = 2.0) -> tuple[int, Exception]:
        """A rank whose peer died fails in its next collective: if another rank's actor died
        (within `grace_s`), report that one instead of the rank that merely failed after it."""
        if isinstance(error, self.ray.exceptions.RayActorError) or not pending:
            return rank, error
        done, _ = self.ray.wait(pending, num_returns=len(pending), timeout=grace_s)
        for ref in done:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError as died:
                return rank_of[ref], died
            except Exception:  # noqa: BLE001 - another follower's failure
                continue
        return rank, error

    def _gather(self, refs: list[Any]) -> list[Any]:
        """Results of `refs` (one per rank, in rank order), failing on the first rank that fails."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            rank = rank_of[done[0]]
            try:
                results[rank] = self.ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - RayActorError, RayTaskError, ...
                rank, e = self._blame(rank, e, pending, rank_of)
                self.shutdown()
                raise WorkerDiedError(rank, f"{type(e).__name__}: {e}") from None
        return [results[rank] for rank in range(len(refs))]


class _RayStep:
    """One submitted step: every rank's result is awaited (a failed actor raises), the output rank's kept."""

    def __init__(self, executor: RayExecutor, refs: list[Any]) -> None:
        self.executor = executor
        self.refs = refs
        self._output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        """Wait for every rank; the output rank's output."""
        if self._output is None:
            outputs = self.executor._gather(self.refs)
            self._output = outputs[self.executor.config.parallel_config.output_rank]  # type: ignore[assignment]
        return self._output  # type: ignore[return-value]
