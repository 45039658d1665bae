"""GPT-2: learned absolute position embeddings, pre-LayerNorm blocks, GELU (tanh) MLP, tied LM head.

Hugging Face stores GPT-2's linear layers as Conv1D weights [in, out]; they are transposed on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.distributed import is_first_pp_rank, is_last_pp_rank
from pagedllm.layers.layernorm import LayerNorm
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.mha import MultiHeadSelfAttention
from pagedllm.models.pipeline import (
    IntermediateTensors,
    PPMissingLayer,
    first_stage_module,
    is_missing_parameter,
    last_stage_module,
    make_layers,
    tied_embedding_target,
)
from pagedllm.models.weight_utils import load_tensor

# HF activation name -> torch gelu "approximate" argument
_GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _gelu_approximation(name: str) -> str:
    if name not in _GELU_APPROXIMATION:
        raise ValueError(f"activation_function {name!r} is not supported by GPT-2; supported: {sorted(_GELU_APPROXIMATION)}.")
    return _GELU_APPROXIMATION[name]


def gpt2_attention(config: dict[str, Any], layer_idx: int) -> MultiHeadSelfAttention:
    """GPT-2's self-attention: biased fused QKV, optionally unscaled or scaled by 1 / (layer_idx + 1)."""
    hidden, heads = config["n_embd"], config["n_head"]
    scale = (hidden // heads) ** -0.5 if config.get("scale_attn_weights", True) else 1.0
    if config.get("scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer_idx + 1)
    return MultiHeadSelfAttention(hidden, heads, bias=True, scale=scale)


class GPT2MLP(nn.Module):
    """c_proj(gelu(c_fc(x)))."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["n_embd"]
        inner = config.get("n_inner") or 4 * hidden
        self.c_fc = ColumnParallelLinear(hidden, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, hidden, bias=True)
        self.approximate = _gelu_approximation(config.get("activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: dict[str, Any], layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config["n_embd"], config.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = LayerNorm(hidden, eps)
        self.attn = gpt2_attention(config, layer_idx)
        self.ln_2 = LayerNorm(hidden, eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """One block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""
        hidden = hidden + self.attn(self.ln_1(hidden), metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    """Token + position embeddings, blocks, final LayerNorm."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["n_embd"]
        # The first pipeline stage embeds, the last one norms (pipeline.py).
        self.wte = first_stage_module(lambda: VocabParallelEmbedding(config["vocab_size"], hidden))
        self.wpe = first_stage_module(lambda: nn.Embedding(config["n_positions"], hidden).requires_grad_(False))
        self.start_layer, self.end_layer, self.h = make_layers(config["n_layer"], lambda i: GPT2Block(config, i))
        self.ln_f = last_stage_module(lambda: LayerNorm(hidden, config.get("layer_norm_epsilon", 1e-5)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Token ids [T] at absolute positions [T] -> final hidden states [T, hidden] (pipeline
        stages: from / to the activations of the stage before / after)."""
        if intermediate_tensors is None:
            hidden = self.wte(input_ids) + self.wpe(positions)
        else:
            hidden = intermediate_tensors["hidden"]
        for block in islice(self.h, self.start_layer, self.end_layer):
            hidden = block(hidden, metadata)
        if not is_last_pp_rank():
            return {"hidden": hidden}
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 causal LM with the LM head tied to the token embedding."""

    intermediate_keys: tuple[str, ...] = ("hidden",)  # what a pipeline stage hands the next one

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = last_stage_module(lambda: ParallelLMHead(config["vocab_size"], config["n_embd"]))
        if is_first_pp_rank() and is_last_pp_rank():
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Final hidden states for every token of the flat batch (a pipeline stage other than
        the last: its activations for the next stage)."""
        return self.transformer(input_ids, positions, metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Vocabulary logits [N, vocab] for hidden states [N, hidden]; with
        `gather=False` this rank's slice of the vocabulary (ParallelLMHead.compute_logits)."""
        return self.lm_head.compute_logits(hidden, gather)

    def attention_layers(self) -> list[Attention]:
        """This stage's Attention modules in layer order (the runner binds one KV cache to each)."""
        return [block.attn.attn for block in self.transformer.h if not isinstance(block, PPMissingLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF GPT-2 tensors (Conv1D weights transposed, c_attn split into q/k/v); returns names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers of old checkpoints; the LM head is tied
            if not name.startswith("transformer."):
                name = "transformer." + name  # checkpoints of the bare GPT2Model
            is_conv1d = name.endswith(".weight") and any(p in name for p in (".c_attn.", ".c_proj.", ".c_fc."))
            is_fused_qkv = ".c_attn." in name
            # The shared attention module names its projections qkv_proj / out_proj.
            name = name.replace(".attn.c_attn.", ".attn.qkv_proj.").replace(".attn.c_proj.", ".attn.out_proj.")
            name = tied_embedding_target(name, "transformer.wte.weight", tied=True)
            if is_missing_parameter(name, self):
                continue  # another pipeline stage's
            if name not in params:
                raise ValueError(f"Checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}.")
            param = params[name]
            if is_conv1d:
                tensor = tensor.t()
            if is_fused_qkv:
                for shard_id, part in zip("qkv", tensor.chunk(3, dim=0)):
                    param.weight_loader(param, part, shard_id)
            else:
                load_tensor(param, tensor, name)
            loaded.add(name)
        loaded.add("lm_head.weight")
        return loaded
