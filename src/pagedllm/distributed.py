"""Tensor-parallel process-group state and collectives (a single rank unless initialised)."""

from __future__ import annotations

from urllib.parse import urlparse

import torch
import torch.distributed as dist

_TP_RANK = 0
_TP_SIZE = 1
# Small GPU all-reduces over symmetric memory (custom_all_reduce.py), when set up.
_CUSTOM_ALL_REDUCE = None
# The group's key-value store (rank 0 hosts its server). Held here, not only by the group, so
# that it outlives destroy_process_group: rank 0 keeps serving it until the other ranks are
# gone, since NCCL's watchdog in each rank polls it until that rank exits.
_STORE: dist.Store | None = None


def set_tensor_parallel_state(rank: int, world_size: int) -> None:
    """Record this process's tensor-parallel rank and world size (after init_process_group)."""
    global _TP_RANK, _TP_SIZE
    _TP_RANK, _TP_SIZE = rank, world_size


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group (0 without parallelism)."""
    return _TP_RANK


def get_tp_size() -> int:
    """Number of tensor-parallel ranks (1 without parallelism)."""
    return _TP_SIZE


def init_distributed_environment(rank: int, world_size: int, init_method: str, device: torch.device,
                                 custom_all_reduce: bool = True) -> None:
    """Join the tensor-parallel process group: NCCL between GPUs, gloo between CPU processes.

    On GPUs, small all-reduces go through symmetric memory over NVLink when it works here
    (`custom_all_reduce.py`; `custom_all_reduce=False` keeps NCCL for all of them).
    """
    global _CUSTOM_ALL_REDUCE, _STORE
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        _STORE = _create_store(init_method, rank, world_size)
        dist.init_process_group(backend, store=_STORE, rank=rank, world_size=world_size, **kwargs)
        if device.type == "cuda" and custom_all_reduce:
            from pagedllm.custom_all_reduce import create_custom_all_reduce

            _CUSTOM_ALL_REDUCE = create_custom_all_reduce(device, rank, world_size)
    set_tensor_parallel_state(rank, world_size)


def _create_store(init_method: str, rank: int, world_size: int) -> dist.TCPStore:
    """The group's TCP store at `tcp://host:port`: rank 0 serves it, the others connect."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"The distributed init method must be tcp://host:port, got {init_method!r}.")
    return dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0,
                         timeout=dist.constants.default_pg_timeout)


def destroy_distributed_environment() -> None:
    """Leave the process group (if any) and return to single-rank state.

    The store stays (see _STORE): on rank 0 its server keeps answering the other ranks until
    this process exits."""
    global _CUSTOM_ALL_REDUCE
    _CUSTOM_ALL_REDUCE = None
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tensor_parallel_state(0, 1)


def tensor_model_parallel_broadcast(x: torch.Tensor) -> torch.Tensor:
    """Give every rank rank 0's copy of `x`, in place; a no-op on one rank."""
    if _TP_SIZE > 1:
        dist.broadcast(x, src=0)
    return x


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the tensor-parallel ranks, in place; a no-op on one rank."""
    if _TP_SIZE > 1:
        if _CUSTOM_ALL_REDUCE is not None and _CUSTOM_ALL_REDUCE.applies(x):
            return _CUSTOM_ALL_REDUCE.all_reduce_(x)
        dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's tensor along `dim`; identity on one rank."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
