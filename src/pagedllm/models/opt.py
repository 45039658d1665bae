"""OPT: learned positions (offset 2), ReLU MLP, pre- or post-LayerNorm blocks, optional
project_in/project_out when word_embed_proj_dim != hidden_size, tied LM head."""

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

# OPT's position table has two extra leading rows (a fairseq legacy): position p uses row p + 2.
_POSITION_OFFSET = 2

# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED_PARAMS = [(".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v")]


def _layer_norm(config: dict[str, Any], size: int) -> LayerNorm:
    return LayerNorm(size, 1e-5, elementwise_affine=config.get("layer_norm_elementwise_affine", True),
                     bias=config.get("enable_bias", True))


class OPTDecoderLayer(nn.Module):
    """Attention and ReLU MLP blocks, each with LayerNorm before (pre-LN) or after (post-LN) its residual add."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        bias = config.get("enable_bias", True)
        act = config.get("activation_function", "relu")
        if act != "relu":
            raise ValueError(f"activation_function {act!r} is not supported by OPT (relu only).")
        self.do_layer_norm_before = config.get("do_layer_norm_before", True)
        self.self_attn = MultiHeadSelfAttention(hidden, config["num_attention_heads"], bias=bias)
        self.self_attn_layer_norm = _layer_norm(config, hidden)
        self.fc1 = ColumnParallelLinear(hidden, config["ffn_dim"], bias=bias)
        self.fc2 = RowParallelLinear(config["ffn_dim"], hidden, bias=bias)
        self.final_layer_norm = _layer_norm(config, hidden)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """One decoder layer, [T, hidden] -> [T, hidden]."""
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, metadata)
        if not self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(F.relu(self.fc1(hidden)))
        if not self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    """Embeddings (with optional input projection), decoder layers, final norm and optional output projection."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        embed_dim = config.get("word_embed_proj_dim") or hidden
        # The first pipeline stage embeds, the last one norms and projects out (pipeline.py).
        self.embed_tokens = first_stage_module(lambda: VocabParallelEmbedding(config["vocab_size"], embed_dim))
        self.embed_positions = first_stage_module(
            lambda: nn.Embedding(config["max_position_embeddings"] + _POSITION_OFFSET, hidden).requires_grad_(False))
        self.project_in: nn.Module | None = None
        self.project_out: nn.Module | None = None
        if embed_dim != hidden:
            # Small and replicated on every rank (their outputs feed replicated tensors).
            self.project_in = first_stage_module(lambda: nn.Linear(embed_dim, hidden, bias=False).requires_grad_(False))
            self.project_out = last_stage_module(lambda: nn.Linear(hidden, embed_dim, bias=False).requires_grad_(False))
        has_final_norm = config.get("do_layer_norm_before", True) and not config.get("_remove_final_layer_norm", False)
        self.final_layer_norm = last_stage_module(lambda: _layer_norm(config, hidden)) if has_final_norm else None
        self.start_layer, self.end_layer, self.layers = make_layers(
            config["num_hidden_layers"], lambda i: OPTDecoderLayer(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Token ids [T] at absolute positions [T] -> final hidden states [T, word_embed_proj_dim]
        (pipeline stages: from / to the activations of the stage before / after)."""
        if intermediate_tensors is None:
            hidden = self.embed_tokens(input_ids)
            if self.project_in is not None:
                hidden = self.project_in(hidden)
            hidden = hidden + self.embed_positions(positions + _POSITION_OFFSET)
        else:
            hidden = intermediate_tensors["hidden"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden = layer(hidden, metadata)
        if not is_last_pp_rank():
            return {"hidden": hidden}
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    """Holds the decoder (mirrors HF's `model.decoder.*` parameter names)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    """OPT causal LM with the LM head tied to the token embedding."""

    intermediate_keys: tuple[str, ...] = ("hidden",)  # what a pipeline stage hands the next one

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        embed_dim = config.get("word_embed_proj_dim") or config["hidden_size"]
        self.lm_head = last_stage_module(lambda: ParallelLMHead(config["vocab_size"], embed_dim))
        if is_first_pp_rank() and is_last_pp_rank():
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Final hidden states for every token of the flat batch (a pipeline stage other than
        the last: its activations for the next stage)."""
        return self.model.decoder(input_ids, positions, metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Vocabulary logits [N, vocab] for hidden states [N, word_embed_proj_dim]; with
        `gather=False` this rank's slice of the vocabulary (ParallelLMHead.compute_logits)."""
        return self.lm_head.compute_logits(hidden, gather)

    def attention_layers(self) -> list[Attention]:
        """This stage's Attention modules in layer order (the runner binds one KV cache to each)."""
        return [layer.self_attn.attn for layer in self.model.decoder.layers if not isinstance(layer, PPMissingLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF OPT tensors (q/k/v fused into qkv_proj); returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight":
                continue  # tied to the embedding
            if name.startswith("decoder."):
                name = "model." + name  # checkpoints of the bare OPTModel
            name = tied_embedding_target(name, "model.decoder.embed_tokens.weight", tied=True)
            if is_missing_parameter(name, self):
                continue  # another pipeline stage's
            for ckpt_part, param_part, shard_id in _STACKED_PARAMS:
                if ckpt_part in name:
                    name = name.replace(ckpt_part, param_part)
                    params[name].weight_loader(params[name], tensor, shard_id)
                    break
            else:
                if name not in params:
                    raise ValueError(f"Checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}.")
                load_tensor(params[name], tensor, name)
            loaded.add(name)
        loaded.add("lm_head.weight")
        return loaded
