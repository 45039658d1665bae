"""Loading one checkpoint tensor into one parameter, shared by every model's `load_weights`."""

from __future__ import annotations

import torch
from torch import nn


def load_tensor(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    """Use the parameter's own (sharding) `weight_loader` if it has one, else copy after a shape check."""
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(param, tensor)
        return
    if param.shape != tensor.shape:
        raise ValueError(f"Checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}.")
    param.data.copy_(tensor)
