"""Weight-only int8 quantization for CPU decoding (`--quantization int8`).

At batch 1 a CPU decode step is bound by reading the weights. Storing each linear layer's
weight as int8 with one bf16 scale per output channel (symmetric, max-abs) reads 4x fewer
bytes than fp32 and 2x fewer than bf16, and `torch._weight_int8pack_mm` multiplies bf16
activations by it directly. The LM head and embeddings stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed import tensor_model_parallel_all_reduce
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear

SUPPORTED_QUANTIZATION = ("int8",)


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (int8 weight [N, K], scales [N]) with w ~= q * scale."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def _int8_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), layer.weight_int8, layer.weight_scale)
    return out.view(*shape[:-1], -1)


class Int8ColumnParallelLinear(nn.Module):
    """A column-parallel (or fused) layer whose weight is int8 with per-channel scales."""

    def __init__(self, layer: ColumnParallelLinear) -> None:
        super().__init__()
        q, scales = quantize_weight_int8(layer.weight.data)
        self.register_buffer("weight_int8", q)
        # The int8 kernel multiplies bf16 activations; the scales must match their dtype.
        self.register_buffer("weight_scale", scales.to(torch.bfloat16))
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., K] (bf16) -> [.., N]."""
        out = _int8_forward(self, x)
        return out if self.bias is None else out + self.bias


class Int8RowParallelLinear(Int8ColumnParallelLinear):
    """A row-parallel layer with an int8 weight; partial sums are all-reduced as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., K/tp] -> [.., N], summed over ranks."""
        out = tensor_model_parallel_all_reduce(_int8_forward(self, x))
        return out if self.bias is None else out + self.bias


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Replace every linear layer of a loaded model by its quantized form, in place."""
    if method not in SUPPORTED_QUANTIZATION:
        raise ValueError(f"quantization {method!r} is not supported; supported: {', '.join(SUPPORTED_QUANTIZATION)}.")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RowParallelLinear):
                setattr(parent, name, Int8RowParallelLinear(child))  # type: ignore[arg-type]
            elif isinstance(child, ColumnParallelLinear):
                setattr(parent, name, Int8ColumnParallelLinear(child))
    return model

