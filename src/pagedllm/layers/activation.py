"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the concatenation [gate | up] on the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Split the last dimension in half and gate the second half by the first."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
