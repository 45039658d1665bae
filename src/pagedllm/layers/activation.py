"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.layers.custom_op import CustomOp


class SiluAndMul(CustomOp):
    """silu(gate) * up, where the input is the concatenation [gate | up] on the last dim."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """Split the last dimension in half and gate the second half by the first."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """Same as forward_native, in one Triton kernel."""
        from pagedllm.layers import triton_fused

        return triton_fused.silu_and_mul(x)


class GeluAndMul(CustomOp):
    """gelu(gate) * up over [gate | up] (GeGLU, e.g. Gemma); approximate "none" or "tanh"."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluAndMul approximate must be 'none' or 'tanh', got {approximate!r}.")
        self.approximate = approximate

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """Split the last dimension in half and gate the second half by gelu of the first."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """The tanh approximation in one Triton kernel; exact (erf) GELU stays in torch."""
        if self.approximate != "tanh":
            return self.forward_native(x)
        from pagedllm.layers import triton_fused

        return triton_fused.gelu_tanh_and_mul(x)


def gated_act_name(act: object) -> str | None:
    """The skinny GEMM's name for a gated-activation layer whose fused kernel is on ("silu" for
    SiluAndMul, "gelu_tanh" for GeluAndMul(approximate="tanh")), else None.

    Exact types only: a subclass may compute something else. Exact-erf GELU has no fused kernel.
    """
    if not isinstance(act, CustomOp) or not act.use_fused_kernels:
        return None
    if type(act) is SiluAndMul:
        return "silu"
    if type(act) is GeluAndMul and act.approximate == "tanh":
        return "gelu_tanh"
    return None
