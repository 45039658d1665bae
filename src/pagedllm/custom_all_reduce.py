"""All-reduce over NVLink through torch symmetric memory, for the small tensors of decode steps.

NCCL's all-reduce costs ~22 us at batch 1 on two H200s even inside a CUDA graph; a decode step of
an 8B model at TP=2 runs 64 of them (~1.4 ms of a ~3.4 ms step). With symmetric memory every rank
maps its peers' buffers. The smallest tensors (up to `one_shot_max_bytes`) go through our one-shot
Triton kernel (`one_shot_all_reduce.py`: push words tagged with the call's epoch to every peer,
poll for theirs, sum locally, in one launch);
larger ones through torch's `two_shot_all_reduce_` (each rank reduces its slice from all peers'
buffers, then gathers the others' slices) with a copy in and out of the symmetric buffer.

NVLink multicast (NVLS) stays off (TORCH_SYMM_MEM_DISABLE_MULTICAST=1): the kernel uses plain
peer loads and stores. Used for bf16/fp16 tensors up to the buffer size on CUDA; anything else,
and any rank where the set-up or its self-check fails, keeps NCCL (the ranks agree on the choice).
`--disable-custom-all-reduce` turns it off.

The same peer-mapped memory carries two one-shot kernels that fold a neighbour of a collective
into it: the vocabulary-parallel embedding's lookup with its all-reduce
(`one_shot_embedding_all_reduce`, PAGEDLLM_ONE_SHOT_EMBEDDING=0 turns it off) and sharded
sampling's exchange of partial winners with their reduce (`one_shot_argmax.py`, a buffer of its
own; PAGEDLLM_ONE_SHOT_ARGMAX=0 turns it off).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist

from pagedllm.envs import on_by_default

logger = logging.getLogger(__name__)

_MAX_BYTES = 8 << 20  # decode-sized activations; prefill chunks go to NCCL
_ONE_SHOT_MAX_BYTES = 128 << 10  # H200 x 2: one-shot wins at 128 KiB (0.38 vs 0.64 ms per 64), loses at 512 KiB
_SITE_ALIGN = 256  # bytes: where each GEMV all-reduce site starts in the shared allocation
# "0" turns off the one-shot kernels that fold a neighbour into the collective: the embedding
# lookup (embedding_all_reduce) and the sampling partials' exchange (partials_exchange).
ONE_SHOT_EMBEDDING_ENV_VAR = "PAGEDLLM_ONE_SHOT_EMBEDDING"
ONE_SHOT_ARGMAX_ENV_VAR = "PAGEDLLM_ONE_SHOT_ARGMAX"


class SymmMemAllReduce:
    """In-place sum of a CUDA tensor over a process group (the whole world, or one pipeline
    stage's tensor-parallel group) through a symmetric buffer."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype = torch.bfloat16, one_shot_max_bytes: int = _ONE_SHOT_MAX_BYTES) -> None:
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed._symmetric_memory as symm_mem

        from pagedllm import one_shot_all_reduce, one_shot_argmax

        self.group = group
        self.group_name = (group if group is not None else dist.group.WORLD).group_name  # type: ignore[union-attr]
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch needs it; newer warns it is not needed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.dtype = dtype
        self.device = device
        # Ranks within the group: the peers' buffers are listed in group order.
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        element_size = torch.tensor([], dtype=dtype).element_size()
        self.buffer = symm_mem.empty(_MAX_BYTES // element_size, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        # The one-shot kernel's buffer: int64 words [2 slots][world regions][slot words], each
        # two 16-bit elements and an epoch; and this rank's epoch per program.
        self.one_shot_max_bytes = one_shot_max_bytes
        self.slot_words = one_shot_max_bytes // 4
        words, addresses = self._symmetric_zeros(2 * self.world_size * self.slot_words, torch.int64)
        self.epochs = torch.zeros(one_shot_all_reduce.MAX_PROGRAMS, dtype=torch.int32, device=device)
        self.buffer_ptrs = torch.tensor(addresses, dtype=torch.int64, device=device)
        self._one_shot_buffer = words  # keep the mapping alive
        self._exchange_buffers: list[torch.Tensor] = []  # exchanges()', likewise
        # Sharded sampling's partials (one_shot_argmax.py): a buffer and epochs of their own.
        slot = one_shot_argmax.MAX_ROWS * one_shot_argmax.ROW_WORDS
        argmax_words, argmax_addresses = self._symmetric_zeros(2 * self.world_size * slot, torch.int64)
        self._argmax_buffer = argmax_words
        self.partials_exchange: one_shot_argmax.PartialsExchange | None = one_shot_argmax.PartialsExchange(
            torch.tensor(argmax_addresses, dtype=torch.int64, device=device),
            torch.zeros(one_shot_argmax.MAX_PROGRAMS, dtype=torch.int32, device=device), slot, self.rank,
            self.world_size)
        self._await_peers_zeroed()

    def _symmetric_zeros(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
        """A zeroed tensor in symmetric memory and each rank's address of it, as mapped on this
        device. A collective (a rendezvous): every rank of the group calls it alike; no peer may
        write into it before `_await_peers_zeroed`."""
        import torch.distributed._symmetric_memory as symm_mem

        tensor = symm_mem.empty(numel, dtype=dtype, device=self.device)
        tensor.zero_()
        return tensor, self._peer_addresses(symm_mem.rendezvous(tensor, self.group_name), tensor)

    def _await_peers_zeroed(self) -> None:
        """Return once every rank has zeroed its new symmetric buffers (`_symmetric_zeros`)."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        torch.cuda.synchronize(self.device)  # the barrier's NCCL work done before anything else runs

    def _peer_addresses(self, handle: object, local: torch.Tensor) -> list[int]:
        """Each rank's address of the symmetric tensor `local`, as mapped on this device."""
        addresses = [int(a) for a in handle.buffer_ptrs]  # type: ignore[attr-defined]
        if addresses[self.rank] != local.data_ptr():
            raise RuntimeError("symmetric tensor does not start at its allocation")
        return addresses

    def exchanges(self, sizes: list[int]) -> list:  # -> list[cuda_gemv.Exchange] (imported lazily: CUDA only)
        """Buffers for all-reduce sites of `sizes` elements each, carried by the CUDA GEMVs on
        either side of them (layers/cuda_gemv.py): slices of one symmetric allocation, so that a
        model's sites cost one rendezvous. A collective: every rank of the group calls it alike
        (at model load, never in a capture)."""
        from pagedllm.layers.cuda_gemv import Exchange, exchange_buffer_bytes

        if not sizes:
            return []
        spans = [exchange_buffer_bytes(self.world_size, n) for n in sizes]
        offsets = [0]
        for span in spans:  # every site starts on a _SITE_ALIGN boundary (the kernel's vector loads)
            offsets.append(offsets[-1] + -(-span // _SITE_ALIGN) * _SITE_ALIGN)
        buffer, addresses = self._symmetric_zeros(offsets[-1] // 8, torch.int64)
        epochs = torch.zeros(len(sizes), 1, dtype=torch.int64, device=self.device)
        self._await_peers_zeroed()
        self._exchange_buffers.append(buffer)
        return [Exchange(buffer[offset // 8 : (offset + span) // 8], tuple(a + offset for a in addresses), epochs[i],
                         self.rank, self.world_size)
                for i, (offset, span) in enumerate(zip(offsets, spans))]

    def applies(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through the symmetric buffer (else NCCL)."""
        return (x.is_cuda and x.dtype == self.dtype and x.is_contiguous()
                and x.numel() <= self.buffer.numel() and (x.numel() * x.element_size()) % 16 == 0)

    def embedding_all_reduce(self, input_ids: torch.Tensor, table: torch.Tensor, vocab_start: int) -> torch.Tensor | None:
        """A vocabulary-parallel embedding: the lookup of this rank's slice (`table`, tokens from
        vocab_start on) and the all-reduce in one one-shot launch, [T, hidden]; None where the
        one-shot kernel does not take it (the caller looks up and all-reduces). Every rank decides
        alike (shapes only)."""
        nbytes = input_ids.numel() * table.shape[1] * table.element_size()
        if not (on_by_default(ONE_SHOT_EMBEDDING_ENV_VAR) and table.is_cuda and table.dtype == self.dtype
                and table.is_contiguous() and table.shape[1] % 2 == 0 and 0 < nbytes <= self.one_shot_max_bytes):
            return None
        from pagedllm.one_shot_all_reduce import one_shot_embedding_all_reduce

        return one_shot_embedding_all_reduce(input_ids, table, vocab_start, self.buffer_ptrs, self.epochs,
                                             self.slot_words, self.rank, self.world_size)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (CUDA-graph capturable: no host syncs)."""
        if x.numel() * x.element_size() <= self.one_shot_max_bytes and x.data_ptr() % 4 == 0:
            from pagedllm.one_shot_all_reduce import one_shot_all_reduce_

            return one_shot_all_reduce_(x, self.buffer_ptrs, self.epochs, self.slot_words, self.rank, self.world_size)
        staged = self.buffer[: x.numel()]
        staged.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        x.view(-1).copy_(staged)
        return x


def create_custom_all_reduce(device: torch.device, group: dist.ProcessGroup | None = None) -> SymmMemAllReduce | None:
    """A checked SymmMemAllReduce over `group` (None: the whole world), or None (NCCL) when it
    cannot run here; every rank of the group decides alike."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    comm: SymmMemAllReduce | None = None
    try:
        comm = SymmMemAllReduce(device, group)
    except Exception as e:  # noqa: BLE001 - any failure means NCCL, on every rank
        logger.warning("Custom all-reduce unavailable (%s); using NCCL.", e)
    # The self-check's kernels wait for their peers: run them only where every rank got this far.
    if not _all_ranks_agree(comm is not None, device, group):
        return None
    assert comm is not None
    expected = world_size * (world_size + 1) / 2
    failure = None
    # One size through each kernel (one-shot, two-shot), and both slots of the one-shot's buffer.
    for numel in (4096, 4096, comm.one_shot_max_bytes // 2 + 8, 4096):
        probe = torch.full((numel,), float(rank + 1), dtype=comm.dtype, device=device)
        try:
            comm.all_reduce_(probe)
        except Exception as e:  # noqa: BLE001 - e.g. a kernel that does not compile here (alike on every rank)
            failure = f"self-check ({e})"
            break
        if failure is None and not bool((probe == expected).all()):
            failure = f"self-check of {numel} elements summed to {probe[0].item()} instead of {expected}"
    if failure is not None:
        logger.warning("Custom all-reduce failed its %s; using NCCL.", failure)
    if not _all_ranks_agree(failure is None, device, group):
        return None
    if not (on_by_default(ONE_SHOT_ARGMAX_ENV_VAR)
            and _all_ranks_agree(_partials_exchange_works(comm, device), device, group)):
        comm.partials_exchange = None  # sharded sampling gathers its partials through NCCL
    logger.info("Custom all-reduce: symmetric memory over NVLink for bf16 tensors up to %d MiB "
                "(one-shot kernel up to %d KiB).", _MAX_BYTES >> 20, comm.one_shot_max_bytes >> 10)
    return comm


def _partials_exchange_works(comm: SymmMemAllReduce, device: torch.device) -> bool:
    """Self-check of the sampling partials' exchange, twice (both slots): in the first row rank r
    offers token 100 r with key r, so the last rank's wins; in the second every rank ties at key
    -1 with token 100 r + 5, so rank 0's token 5 wins."""
    from pagedllm.worker.sharded_sampling import Partials

    exchange, rank, world = comm.partials_exchange, comm.rank, comm.world_size
    assert exchange is not None
    keys = torch.tensor([[float(rank), float("-inf")], [-1.0, -2.0]], device=device)
    ids = torch.tensor([[100 * rank, 100 * rank + 1], [100 * rank + 5, 100 * rank + 6]], dtype=torch.int32,
                       device=device)
    try:
        for _ in range(2):
            tokens = exchange(Partials(keys, ids, block_c=2)).tolist()
            if tokens != [100 * (world - 1), 5]:
                logger.warning("Sampling partials' exchange self-check gave %s; gathering through NCCL.", tokens)
                return False
    except Exception as e:  # noqa: BLE001 - e.g. a kernel that does not compile here (alike on every rank)
        logger.warning("Sampling partials' exchange failed its self-check (%s); gathering through NCCL.", e)
        return False
    return True


def _all_ranks_agree(ok: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """True when `ok` holds on every rank of `group` (an NCCL all-reduce of the flags)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() >= 1)
