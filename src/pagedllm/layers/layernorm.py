"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.custom_op import CustomOp


class RMSNorm(CustomOp):
    """Root-mean-square layer norm, computed in fp32 like Hugging Face's LlamaRMSNorm.

    With `residual`, adds it first and also returns the sum (the next residual), saving a pass.
    On CUDA both are one fused Triton kernel (`triton_fused.fused_add_rms_norm`).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise `x` (or `x + residual`, returning the sum as the new residual)."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def forward_cuda(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Same as forward_native, in one Triton kernel."""
        from pagedllm.layers import triton_fused

        if (x.shape[-1] > triton_fused.MAX_NORM_BLOCK or x.dtype != self.weight.dtype
                or (residual is not None and residual.dtype != x.dtype)):
            # Mixed dtypes promote in torch; the kernel writes x's dtype. Rare: keep torch's answer.
            return self.forward_native(x, residual)
        if residual is None:
            return triton_fused.rms_norm(x, self.weight, self.variance_epsilon)
        return triton_fused.fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in fp32 before rounding (Hugging Face's Gemma2RMSNorm).

    Checkpoints store `weight` centred on 0. No fused kernel: the CUDA path is the PyTorch one.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.float())).to(input_dtype)

    def forward_cuda(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The PyTorch path (the fused RMSNorm kernel scales by weight, not 1 + weight)."""
        return self.forward_native(x, residual)


class LayerNorm(nn.Module):
    """Standard layer norm (mean and variance over the last dim), with optional affine weight and bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x` [.., hidden]."""
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
