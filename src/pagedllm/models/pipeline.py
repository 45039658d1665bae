"""Pipeline parallelism inside a model: which decoder layers this stage holds, placeholders for
the modules other stages hold, and the activations handed from one stage to the next.

Every stage builds the whole model's module tree, but the modules it does not run (other
stages' decoder layers; the embedding off the first stage; the final norm and LM head off the
last) are `PPMissingLayer`s without parameters. Parameter names therefore stay those of the
checkpoint (`model.layers.17.mlp...` on whichever stage holds layer 17), and a stage's loader
skips the tensors whose module is missing here (`is_missing_parameter`).

A stage other than the last returns its activations as `IntermediateTensors` (name -> [T,
hidden]); the next stage receives them in the order of the model's `intermediate_keys` and
starts from them instead of the embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedllm.distributed import get_pp_rank, get_pp_size, is_first_pp_rank, is_last_pp_rank

# Activations passed between stages, by name (e.g. "hidden", "residual").
IntermediateTensors = dict[str, torch.Tensor]


class PPMissingLayer(nn.Identity):
    """Stands in for a module that another pipeline stage holds: no parameters, never run."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Refuse: a stage must never run another stage's module."""
        raise RuntimeError("This module belongs to another pipeline stage.")


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Layers [start, end) of stage `pp_rank` of `pp_size`: an even split, one more layer each
    for the first stages when it does not divide (the last stage also runs the LM head)."""
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} decoder layers cannot be split over pipeline_parallel_size={pp_size} stages.")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def make_layers(num_layers: int, build: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """This stage's layer range and a ModuleList of all `num_layers` layers, where the layers of
    other stages are placeholders (`build(i)` makes layer i)."""
    start, end = stage_layer_range(num_layers, get_pp_rank(), get_pp_size())
    layers = nn.ModuleList(build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers


def first_stage_module(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the first stage (token embeddings), a placeholder elsewhere."""
    return build() if is_first_pp_rank() else PPMissingLayer()


def last_stage_module(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the last stage (final norm, LM head), a placeholder elsewhere."""
    return build() if is_last_pp_rank() else PPMissingLayer()


def _placeholder_parent(name: str, model: nn.Module) -> nn.Module | None:
    """The module holding the first placeholder on parameter `name`'s path, or None if the path
    (dotted, as in the checkpoint) meets no placeholder."""
    module: nn.Module | None = model
    for part in name.split(".")[:-1]:
        parent = module
        if isinstance(module, nn.ModuleList):
            module = module[int(part)] if part.isdigit() and int(part) < len(module) else None
        else:
            module = getattr(module, part, None)
        if module is None:
            return None
        if isinstance(module, PPMissingLayer):
            return parent
    return None


def is_missing_parameter(name: str, model: nn.Module) -> bool:
    """Whether parameter `name` (dotted, as in the checkpoint) belongs to a module of another stage."""
    return _placeholder_parent(name, model) is not None


def is_other_stages_layer(name: str, model: nn.Module) -> bool:
    """Whether parameter `name` belongs to a decoder layer of another stage (not to the embedding
    or LM head, which a tied model's last stage still loads)."""
    return isinstance(_placeholder_parent(name, model), nn.ModuleList)


def empty_intermediate_tensors(keys: tuple[str, ...], num_tokens: int, hidden_size: int, dtype: torch.dtype,
                               device: torch.device) -> IntermediateTensors:
    """Buffers to receive the previous stage's activations into ([num_tokens, hidden_size] each)."""
    return {key: torch.empty(num_tokens, hidden_size, dtype=dtype, device=device) for key in keys}


def tied_embedding_target(name: str, embedding_name: str, tied: bool) -> str:
    """Where checkpoint tensor `name` loads: a tied model's embedding goes to the LM head on a last
    stage that is not also the first (there the two are separate parameters); else `name`."""
    if tied and name == embedding_name and is_last_pp_rank() and not is_first_pp_rank():
        return "lm_head.weight"
    return name
