"""CustomOp: a layer with a PyTorch implementation and a fused Triton one for CUDA tensors.

As vLLM's CustomOp: `forward` dispatches to `forward_cuda` (fused kernels from
`layers/triton_fused.py`) when the input is on a CUDA device and fused kernels are enabled,
else to `forward_native` (plain PyTorch: the CPU path and the oracle the kernels are tested
against). Fused kernels are on by default; `PAGEDLLM_DISABLE_FUSED_KERNELS=1` turns them off
for every layer built afterwards, and `--no-fused-kernels` (ModelConfig.use_fused_kernels) for
one model through `set_fused_kernels`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

DISABLE_ENV_VAR = "PAGEDLLM_DISABLE_FUSED_KERNELS"


def fused_kernels_enabled_by_env() -> bool:
    """False when PAGEDLLM_DISABLE_FUSED_KERNELS is set to anything but '', '0' or 'false'."""
    return os.environ.get(DISABLE_ENV_VAR, "0").strip().lower() in ("", "0", "false")


class CustomOp(nn.Module):
    """Base of the layers that have a fused CUDA implementation next to the PyTorch one."""

    def __init__(self) -> None:
        super().__init__()
        self.use_fused_kernels = fused_kernels_enabled_by_env()

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `forward_cuda` for CUDA inputs with fused kernels enabled, else `forward_native`.

        The first argument decides (for the rotary layer the positions, which live on the
        device of the query and key).
        """
        if self.use_fused_path(x):
            return self.forward_cuda(x, *args, **kwargs)
        return self.forward_native(x, *args, **kwargs)

    def use_fused_path(self, x: Any) -> bool:
        """Whether an input takes the fused kernels: they are enabled and it is on CUDA."""
        return self.use_fused_kernels and x.is_cuda

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        """The PyTorch implementation (CPU path and reference)."""
        raise NotImplementedError

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        """The fused implementation; defaults to the PyTorch one."""
        return self.forward_native(*args, **kwargs)


def set_fused_kernels(model: nn.Module, enabled: bool) -> None:
    """Turn the fused CUDA kernels of every CustomOp in `model` on or off.

    Off also when the environment disables them: the variable is the global escape hatch.
    """
    enabled = enabled and fused_kernels_enabled_by_env()
    for module in model.modules():
        if isinstance(module, CustomOp):
            module.use_fused_kernels = enabled
