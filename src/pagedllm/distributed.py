"""Process-group state and collectives of tensor and pipeline parallelism (a single rank unless
initialised).

Ranks are laid out stage-major: global rank = pp_rank * tp_size + tp_rank. Each pipeline stage's
tp_size ranks form its tensor-parallel group (all-reduces, all-gathers); a stage hands its
activations to the same tensor-parallel rank of the next stage (point-to-point). The first rank
of the last stage is the output rank: the last stage's ranks sample, and the output rank
broadcasts its tokens to them (the other stages get them from the scheduler).
"""

from __future__ import annotations

from urllib.parse import urlparse

import torch
import torch.distributed as dist

_TP_RANK = 0
_TP_SIZE = 1
_PP_RANK = 0
_PP_SIZE = 1
# This stage's tensor-parallel group; None means the whole world (no pipeline parallelism).
_TP_GROUP: dist.ProcessGroup | None = None
# Small GPU all-reduces over symmetric memory (custom_all_reduce.py), when set up.
_CUSTOM_ALL_REDUCE = None


def set_tensor_parallel_state(rank: int, world_size: int) -> None:
    """Record this process's tensor-parallel rank and world size (after init_process_group)."""
    global _TP_RANK, _TP_SIZE
    _TP_RANK, _TP_SIZE = rank, world_size


def set_pipeline_parallel_state(rank: int, size: int) -> None:
    """Record this process's pipeline stage and the number of stages."""
    global _PP_RANK, _PP_SIZE
    _PP_RANK, _PP_SIZE = rank, size


def get_pp_rank() -> int:
    """This process's pipeline stage (0 without pipeline parallelism)."""
    return _PP_RANK


def get_pp_size() -> int:
    """Number of pipeline stages (1 without pipeline parallelism)."""
    return _PP_SIZE


def is_first_pp_rank() -> bool:
    """Whether this stage embeds the tokens (the first stage)."""
    return _PP_RANK == 0


def is_last_pp_rank() -> bool:
    """Whether this stage holds the final norm and LM head, and samples (the last stage)."""
    return _PP_RANK == _PP_SIZE - 1


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group (0 without parallelism)."""
    return _TP_RANK


def get_tp_size() -> int:
    """Number of tensor-parallel ranks (1 without parallelism)."""
    return _TP_SIZE


def init_distributed_environment(rank: int, world_size: int, init_method: str, device: torch.device,
                                 custom_all_reduce: bool = True, pipeline_parallel_size: int = 1) -> None:
    """Join the process group of all `world_size` ranks (NCCL between GPUs, gloo between CPU
    processes) and, with several pipeline stages, one tensor-parallel group per stage.

    On GPUs, a tensor-parallel group's small all-reduces go through symmetric memory over NVLink
    when it works here (`custom_all_reduce.py`; `custom_all_reduce=False` keeps NCCL for all of
    them); every other collective, and the stages' sends, go through NCCL.
    """
    global _CUSTOM_ALL_REDUCE, _TP_GROUP
    if world_size % pipeline_parallel_size:
        raise ValueError(f"world_size={world_size} is not a multiple of pipeline_parallel_size={pipeline_parallel_size}.")
    tp_size = world_size // pipeline_parallel_size
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = _connect_store(init_method)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)
        if pipeline_parallel_size > 1:
            # Every rank creates every stage's group, in the same order (new_group is collective).
            for stage in range(pipeline_parallel_size):
                group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
                if stage == rank // tp_size:
                    _TP_GROUP = group
        if device.type == "cuda" and custom_all_reduce and tp_size > 1:
            from pagedllm.custom_all_reduce import create_custom_all_reduce

            # Each stage's group sets up its own symmetric buffers, side by side.
            _CUSTOM_ALL_REDUCE = create_custom_all_reduce(device, _TP_GROUP)
    set_tensor_parallel_state(rank % tp_size, tp_size)
    set_pipeline_parallel_state(rank // tp_size, pipeline_parallel_size)


def host_store(host: str = "127.0.0.1") -> dist.TCPStore:
    """Serve a process group's key-value store on a port the OS picks (`.port`), for ranks that
    connect to `tcp://host:port`.

    The launcher of the ranks hosts it (the mp executor in the engine's process, the Ray executor
    in rank 0's actor before that rank joins), not a rank: a port picked free earlier and bound
    later may be taken in between (seen once on a 4-GPU machine: EADDRINUSE), and a store served
    by the launcher outlives every rank, so no rank's NCCL watchdog polls a vanished store while
    the group shuts down.
    """
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=dist.constants.default_pg_timeout)


def _connect_store(init_method: str) -> dist.TCPStore:
    """A client of the group's store at `tcp://host:port` (served by host_store)."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"The distributed init method must be tcp://host:port, got {init_method!r}.")
    return dist.TCPStore(url.hostname, url.port, is_master=False, timeout=dist.constants.default_pg_timeout)


def destroy_distributed_environment() -> None:
    """Leave the process group (if any) and return to single-rank state."""
    global _CUSTOM_ALL_REDUCE, _TP_GROUP
    _CUSTOM_ALL_REDUCE = None
    _TP_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tensor_parallel_state(0, 1)
    set_pipeline_parallel_state(0, 1)


def broadcast_from_output_rank(x: torch.Tensor) -> torch.Tensor:
    """Give every tensor-parallel rank of the last stage the output rank's copy of `x` (the
    stage's first rank: ParallelConfig.output_rank), in place; a no-op without TP. Called on the
    last stage only: the other stages learn the sampled tokens from the scheduler."""
    if _TP_SIZE > 1:
        # The group's first rank; without stages the group is the world.
        src = 0 if _TP_GROUP is None else dist.get_global_rank(_TP_GROUP, 0)
        dist.broadcast(x, src=src, group=_TP_GROUP)
    return x


def send_to_next_stage(tensors: list[torch.Tensor]) -> None:
    """Send this stage's activations to the same tensor-parallel rank of the next stage."""
    dst = dist.get_rank() + _TP_SIZE
    for tensor in tensors:
        dist.send(tensor.contiguous(), dst=dst)


def recv_from_prev_stage(tensors: list[torch.Tensor]) -> None:
    """Fill `tensors` (preallocated, in the sender's order) from the previous stage, in place."""
    src = dist.get_rank() - _TP_SIZE
    for tensor in tensors:
        dist.recv(tensor, src=src)


def send_to_first_stage(tensor: torch.Tensor) -> None:
    """Last stage: send `tensor` to the same tensor-parallel rank of the first stage."""
    dist.send(tensor.contiguous(), dst=dist.get_rank() - (_PP_SIZE - 1) * _TP_SIZE)


def recv_from_last_stage(tensor: torch.Tensor) -> None:
    """First stage: fill `tensor` (preallocated) from the last stage, in place."""
    dist.recv(tensor, src=dist.get_rank() + (_PP_SIZE - 1) * _TP_SIZE)


def get_custom_all_reduce():  # -> SymmMemAllReduce | None (custom_all_reduce.py, imported on CUDA only)
    """The tensor-parallel group's symmetric-memory all-reduce, or None (NCCL, or one rank)."""
    return _CUSTOM_ALL_REDUCE


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the tensor-parallel ranks, in place; a no-op on one rank."""
    if _TP_SIZE > 1:
        if _CUSTOM_ALL_REDUCE is not None and _CUSTOM_ALL_REDUCE.applies(x):
            return _CUSTOM_ALL_REDUCE.all_reduce_(x)
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's tensor along `dim`; identity on one rank."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
