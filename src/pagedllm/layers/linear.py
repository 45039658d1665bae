"""Linear layers that know how to shard themselves for tensor parallelism.

Column-parallel layers split the output features across ranks; row-parallel layers split the
input features and all-reduce the partial sums. Fused layers (QKV, gate+up) store several
checkpoint tensors in one weight, so one matmul serves them all; their `weight_loader` puts
each checkpoint tensor (a "shard") in its slice.

The layers are CustomOps: on CUDA with fused kernels on, inputs of at most 16 tokens (decode)
go through the skinny-GEMM Triton kernel (`layers/triton_gemv.py`, via `fused_linear`), which
streams the weight closer to memory bandwidth than cuBLAS at those sizes. It replaces only the
local matmul: the all-reduce and bias handling are the same on both paths. One exception, at one
token on two GPUs: where the CUDA GEMV serves a row-parallel layer and the add + RMSNorm
projection after it, the all-reduce rides on the two kernels (`forward_deferred`,
`PendingAllReduce`, `prepare_gemv_all_reduce`; `PAGEDLLM_GEMV_ALL_REDUCE=0` turns it off). On
one GPU the same two kernels can hand the rows over by their tags (`PAGEDLLM_GEMV_LOCAL_HANDOFF=1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import distributed
from pagedllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from pagedllm.layers.custom_op import CustomOp

# Inputs of at most this many tokens take the skinny-GEMM kernel (its M limit).
SKINNY_MAX_TOKENS = 16
_SKINNY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator}).")
    return numerator // denominator


def skinny_eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the skinny-GEMM kernel serves x [..., hidden] times weight: at most 16 tokens, a
    plain contiguous 2-D weight of x's dtype (bf16/fp16/fp32), no autograd. The device is the
    caller's decision (CUDA, or CPU under TRITON_INTERPRET=1 in tests)."""
    hidden = x.shape[-1] if x.dim() else 0
    return (hidden > 0 and x.numel() <= SKINNY_MAX_TOKENS * hidden
            and type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2
            and weight.dtype in _SKINNY_DTYPES and x.dtype == weight.dtype and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.dim() == 1))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the skinny-GEMM Triton kernel when x has at most 16 tokens.

    Only a plain contiguous 2-D weight of x's dtype (bf16/fp16/fp32) qualifies; anything else
    (more tokens, other dtypes or layouts, tensor subclasses, autograd) goes to F.linear.
    Callers decide the device (CUDA, or CPU under TRITON_INTERPRET=1 in tests).
    """
    hidden = x.shape[-1] if x.dim() else 0
    if skinny_eligible(x, weight, bias):
        from pagedllm.layers.triton_gemv import skinny_linear  # triton only where kernels run

        out = skinny_linear(x.reshape(-1, hidden), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class PendingAllReduce:
    """A row-parallel layer's output whose all-reduce is still in flight: each rank's partial
    rows were pushed into every rank's buffer of `site` (a cuda_gemv.Exchange) by the GEMV, and
    the add + RMSNorm GEMV that consumes it sums them (ColumnParallelLinear.forward_add_rmsnorm).
    Nothing else may consume it."""

    site: Any  # cuda_gemv.Exchange
    shape: tuple[int, ...]


def set_skinny_gemm(model: nn.Module, enabled: bool) -> None:
    """Turn the skinny-GEMM path of every linear layer and LM head of `model` on or off (it is
    one of the fused kernels; the engine turns it off in eager mode, where its per-shape tuning
    would run during the first requests and Triton's launch cost outweighs it)."""
    for module in model.modules():
        if hasattr(module, "skinny_gemm"):
            module.skinny_gemm = enabled


class ColumnParallelLinear(CustomOp):
    """y = x W^T + b with W's output rows split across tensor-parallel ranks."""

    skinny_gemm = True  # few-token inputs through layers/triton_gemv.py (see set_skinny_gemm)

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size = input_size
        self.output_size_per_partition = _divide(output_size, self.tp_size, "output size")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's rows of a full checkpoint tensor."""
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * size, size))

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer; the output holds this rank's slice of the features."""
        return F.linear(x, self.weight, self.bias)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """As forward_native, through the skinny-GEMM kernel for few tokens."""
        if not self.skinny_gemm:
            return self.forward_native(x)
        return fused_linear(x, self.weight, self.bias)

    def can_fuse_add_rmsnorm(self, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether forward_add_rmsnorm folds `norm(hidden, residual)` into this layer's kernel: a
        plain RMSNorm (not Gemma's 1 + w), fused kernels and the skinny GEMM on, <= 16 tokens
        of [T, hidden], residual of the same shape, and every tensor of one dtype."""
        from pagedllm.layers.layernorm import RMSNorm

        return (residual is not None and type(norm) is RMSNorm and norm.use_fused_path(hidden)
                and self.skinny_gemm and self.use_fused_path(hidden) and hidden.dim() == 2
                and residual.shape == hidden.shape and residual.dtype == hidden.dtype
                and norm.weight.dtype == hidden.dtype and type(norm.weight) in (torch.Tensor, nn.Parameter)
                and skinny_eligible(hidden, self.weight, self.bias))

    def forward_add_rmsnorm(self, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(normed), new residual) for `normed, new residual = norm(hidden, residual)`, in one
        skinny-GEMM kernel; only where can_fuse_add_rmsnorm holds. The input is replicated on
        every rank, so the norm over the full hidden size is each rank's own."""
        from pagedllm.layers.triton_gemv_norm import skinny_add_rmsnorm_linear

        return skinny_add_rmsnorm_linear(hidden, residual, norm.weight, norm.variance_epsilon,
                                         self.weight, self.bias)

    def forward_add_rmsnorm_pending(self, norm: nn.Module, hidden: PendingAllReduce, residual: torch.Tensor,
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward_add_rmsnorm where `hidden` is a row-parallel output still to be summed over the
        ranks: the CUDA GEMV pulls the ranks' rows and sums them as it loads its operand (the
        writer checked this layer with RowParallelLinear.can_defer_reduce)."""
        from pagedllm.layers import cuda_gemv

        out = torch.empty((1, self.weight.shape[0]), dtype=residual.dtype, device=residual.device)
        residual_out = torch.empty_like(residual)
        cuda_gemv.gemv("add_rmsnorm", residual, self.weight, out, self.bias, residual, norm.weight,
                       norm.variance_epsilon, residual_out, pull=hidden.site)
        return out, residual_out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers of the same input stored as one (e.g. gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:  # type: ignore[override]
        """Copy this rank's rows of checkpoint shard `shard_id` into its slice of the fused weight."""
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, shard_size).copy_(loaded.narrow(0, self.tp_rank * shard_size, shard_size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections as one layer, heads split across ranks.

    With fewer KV heads than ranks, each KV head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "number of attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "number of key/value heads")
            self.num_kv_head_replicas = 1
        else:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, num_kv_heads, "tensor-parallel size over KV heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:  # type: ignore[override]
        """Copy this rank's heads of checkpoint shard "q", "k" or "v" into the fused weight."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size = kv_size
            start = (self.tp_rank // self.num_kv_head_replicas) * kv_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class RowParallelLinear(CustomOp):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced."""

    skinny_gemm = True  # few-token inputs through layers/triton_gemv.py (see set_skinny_gemm)
    exchange = None  # the buffers of forward_deferred (cuda_gemv.Exchange): prepare_gemv_all_reduce

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_partition = _divide(input_size, self.tp_size, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.bias_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's columns of a full checkpoint tensor."""
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * size, size))

    @staticmethod
    def bias_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
        """The bias is added once, after the all-reduce, so every rank keeps all of it."""
        param.data.copy_(loaded)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer and sum the ranks' partial outputs."""
        return self._reduce_and_add_bias(F.linear(x, self.weight))

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """As forward_native, the local matmul through the skinny-GEMM kernel for few tokens."""
        if not self.skinny_gemm:
            return self.forward_native(x)
        return self._reduce_and_add_bias(fused_linear(x, self.weight))

    def can_fuse_gated(self, gate_up: torch.Tensor) -> bool:
        """Whether forward_gated folds the activation into this layer's kernel for `gate_up`
        [..., 2 * input_size_per_partition]: the fused, skinny-GEMM path for few tokens."""
        return (self.skinny_gemm and self.use_fused_path(gate_up)
                and gate_up.dim() >= 1 and gate_up.shape[-1] == 2 * self.weight.shape[1]
                and skinny_eligible(gate_up, self.weight))

    def forward_gated(self, gate_up: torch.Tensor, act: str) -> torch.Tensor:
        """self(act(gate) * up) for gate_up = [gate | up] (act "silu" or "gelu_tanh"), the
        activation computed inside the skinny-GEMM kernel; only where can_fuse_gated holds.

        Under tensor parallelism gate_up is this rank's MergedColumnParallelLinear output,
        [gate shard | up shard], and this layer's columns are the same intermediate shard, so
        the split at input_size_per_partition is the right one on every rank.
        """
        from pagedllm.layers.triton_gemv import skinny_linear

        hidden = gate_up.shape[-1]
        partial = skinny_linear(gate_up.reshape(-1, hidden), self.weight, act=act)
        return self._reduce_and_add_bias(partial.view(*gate_up.shape[:-1], self.weight.shape[0]))

    def can_defer_reduce(self, sample: torch.Tensor, reader: nn.Module, norm: nn.Module, residual: torch.Tensor,
                         gated: bool = False) -> bool:
        """Whether forward_deferred may leave this layer's all-reduce to `reader`, the
        ColumnParallelLinear whose forward_add_rmsnorm(`norm`, ..., `residual`) consumes the
        output: one token like `sample`, two ranks sharing symmetric memory, no bias, both GEMVs
        on the CUDA kernel (cuda_gemv.can_exchange; `gated`: this layer's input is SiLU-gated)."""
        from pagedllm.layers.layernorm import RMSNorm

        if (self.exchange is None or not self.skinny_gemm or not isinstance(reader, ColumnParallelLinear)
                or not reader.skinny_gemm or type(norm) is not RMSNorm or not norm.use_fused_path(sample)):
            return False
        from pagedllm.layers import cuda_gemv

        return cuda_gemv.can_exchange(sample, self.weight, "silu" if gated else "plain", reader.weight,
                                      self.tp_size, residual, norm.weight)

    def forward_deferred(self, x: torch.Tensor, act: str | None = None) -> PendingAllReduce:
        """This layer's output with the all-reduce left to the next add + RMSNorm GEMV (only where
        can_defer_reduce holds): the CUDA GEMV pushes each rank's rows to every rank. `act`
        "silu": x is a gated [gate | up] input, as in forward_gated."""
        from pagedllm.layers import cuda_gemv

        cuda_gemv.gemv("silu" if act == "silu" else "plain", x.reshape(1, -1), self.weight, None,
                       push=self.exchange)
        return PendingAllReduce(self.exchange, (*x.shape[:-1], self.weight.shape[0]))

    def _reduce_and_add_bias(self, partial: torch.Tensor) -> torch.Tensor:
        # The bias is added after the all-reduce (every rank holds all of it), so it counts once.
        out = tensor_model_parallel_all_reduce(partial)
        if self.bias is not None:
            out = out + self.bias
        return out


def prepare_gemv_all_reduce(model: nn.Module) -> int:
    """Give every row-parallel layer of `model` whose all-reduce can ride on the CUDA GEMVs
    (unless PAGEDLLM_GEMV_ALL_REDUCE=0: two ranks with symmetric memory, sm_90+, bf16 weights
    the CUDA kernel takes, no bias) the symmetric buffers of its site; returns how many. A
    collective: every rank calls it at model load, in the same module order (never in a
    forward, which may be under CUDA-graph capture).

    On one GPU with PAGEDLLM_GEMV_LOCAL_HANDOFF=1 (off by default: slower) the same sites, in
    local memory, carry the hand-off alone: the add + RMSNorm GEMV after the layer takes its
    rows by their tags instead of waiting for the layer's grid to complete
    (cuda_gemv.local_exchanges)."""
    from pagedllm.custom_all_reduce import _all_ranks_agree

    comm = distributed.get_custom_all_reduce()
    tp_size = get_tp_size()
    from pagedllm.layers import cuda_gemv

    if not ((tp_size == 1 and cuda_gemv.local_handoff_enabled()) or (comm is not None and tp_size == 2)):
        return 0

    layers = [m for m in model.modules() if isinstance(m, RowParallelLinear) and m.bias is None]
    if not layers or not cuda_gemv.exchange_enabled_by_env():
        return 0
    weight = layers[0].weight
    ok = (weight.is_cuda and torch.cuda.get_device_capability(weight.device)[0] >= 9 and cuda_gemv.available())
    if not (ok if tp_size == 1 else _all_ranks_agree(ok, weight.device, comm.group)):  # e.g. built on one rank only
        return 0
    sites = [layer for layer in layers if layer.weight.dtype == torch.bfloat16 and layer.weight.shape[0] % 8 == 0
             and cuda_gemv.preferred(layer.weight)]
    sizes = [layer.weight.shape[0] for layer in sites]
    exchanges = cuda_gemv.local_exchanges(sizes, weight.device) if tp_size == 1 else comm.exchanges(sizes)
    for layer, exchange in zip(sites, exchanges):
        layer.exchange = exchange
    return len(sites)
