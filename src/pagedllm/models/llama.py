"""The Llama family: Llama, Mistral, Qwen2 and Qwen3 (and SmolLM, which is a Llama).

Differences handled by the config: GQA, RoPE scaling, tied embeddings, QKV bias (Qwen2),
per-head q/k RMSNorm (Qwen3), explicit head_dim, sliding-window attention (Mistral: every
layer; Qwen2/Qwen3: the layers `models/sliding_window.py` names).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.distributed import is_first_pp_rank, is_last_pp_rank
from pagedllm.layers.activation import SiluAndMul, gated_act_name
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    PendingAllReduce,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.pipeline import (
    IntermediateTensors,
    PPMissingLayer,
    first_stage_module,
    is_missing_parameter,
    last_stage_module,
    make_layers,
    tied_embedding_target,
)
from pagedllm.models.sliding_window import layer_sliding_windows
from pagedllm.models.weight_utils import load_tensor

# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED_PARAMS = [
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]


class LlamaAttention(nn.Module):
    """Self-attention: fused QKV projection, optional q/k norm, RoPE, paged attention, output projection."""

    def __init__(self, config: dict[str, Any], rotary: RotaryEmbedding, layer_idx: int = 0) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        total_heads = config["num_attention_heads"]
        total_kv_heads = config.get("num_key_value_heads") or total_heads
        self.head_dim = config.get("head_dim") or hidden // total_heads
        model_type = config.get("model_type", "llama")
        # Qwen2 always has q/k/v biases and no output bias; the others follow attention_bias.
        qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        o_bias = model_type != "qwen2" and bool(config.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias=qkv_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=o_bias)
        self.qk_norm = model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config["rms_norm_eps"])
            self.k_norm = RMSNorm(self.head_dim, config["rms_norm_eps"])
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5,
                              sliding_window=layer_sliding_windows(config)[layer_idx])

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] -> attention output [T, hidden]."""
        return self.forward_from_qkv(positions, self.qkv_proj(hidden), metadata)

    def forward_from_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, metadata: AttentionMetadata,
                         defer_reduce: bool = False) -> torch.Tensor | PendingAllReduce:
        """The rest of forward, from the QKV projection's output [T, q + 2 kv]; `defer_reduce`:
        the output projection leaves its all-reduce to the next GEMV (RowParallelLinear.forward_deferred)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = qkv.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v, metadata, self.rotary, positions)
        if defer_reduce:
            return self.o_proj.forward_deferred(out)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, config: dict[str, Any], act: nn.Module | None = None) -> None:
        super().__init__()
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        bias = bool(config.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)
        if act is None:  # other gated activations (Gemma's GeGLU) are passed in by their model
            if config.get("hidden_act", "silu") != "silu":
                raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported by the Llama family "
                                 "(silu only).")
            act = SiluAndMul()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        return self.forward_from_gate_up(self.gate_up_proj(x))

    def forward_from_gate_up(self, gate_up: torch.Tensor, defer_reduce: bool = False,
                             ) -> torch.Tensor | PendingAllReduce:
        """down(act(gate) * up) for the gate_up projection's output [T, 2 * inter / tp];
        `defer_reduce` (SiLU only): the down projection leaves its all-reduce to the next GEMV."""
        act = gated_act_name(self.act)
        if defer_reduce:
            return self.down_proj.forward_deferred(gate_up, act)
        # (Quantised layers replace RowParallelLinear and do not fold anything.)
        if (act is not None and isinstance(self.down_proj, RowParallelLinear)
                and self.down_proj.can_fuse_gated(gate_up)):
            # Few tokens: the activation runs inside the down projection's skinny GEMM (every
            # program reads the whole gated row anyway), one kernel and round trip fewer.
            return self.down_proj.forward_gated(gate_up, act)
        return self.down_proj(self.act(gate_up))


def _can_fuse_add_rmsnorm(proj: nn.Module, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether `norm` (add + RMSNorm) can run inside the column-parallel projection after it
    (quantised layers replace ColumnParallelLinear and do not fold anything)."""
    return isinstance(proj, ColumnParallelLinear) and proj.can_fuse_add_rmsnorm(norm, hidden, residual)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block with the residual carried alongside (fused add + norm).

    At one token on two GPUs the all-reduces after the output and down projections can ride on
    the CUDA GEMVs around them (layers/cuda_gemv.py, Exchange): the projection pushes its rows
    to both ranks and the next add + RMSNorm GEMV sums them. The down projection's then reaches
    the next layer as a PendingAllReduce: `next_layer` names it (set by LlamaModel).
    """

    next_layer: tuple[nn.Module, ...] = ()  # (the next plain Llama layer of this stage,) or ()

    def __init__(self, config: dict[str, Any], rotary: RotaryEmbedding, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, layer_idx)
        self.mlp = self.make_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor | PendingAllReduce, residual: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor | PendingAllReduce, torch.Tensor]:
        """One block; returns (hidden, residual) with the residual add deferred to the next norm
        (and, where the all-reduces ride on the GEMVs, hidden still to be summed: see the class)."""
        attn = self.self_attn
        if isinstance(hidden, PendingAllReduce):  # the previous layer checked this layer's QKV GEMV
            qkv, residual = attn.qkv_proj.forward_add_rmsnorm_pending(self.input_layernorm, hidden, residual)
            hidden = self._attention_from_qkv(positions, qkv, residual, metadata)
        # Few tokens: each add + RMSNorm runs inside the projection after it (the skinny GEMM
        # reads the whole row anyway), where the modules are the plain Llama ones.
        elif (residual is not None and type(attn).forward is LlamaAttention.forward
                and _can_fuse_add_rmsnorm(attn.qkv_proj, self.input_layernorm, hidden, residual)):
            qkv, residual = attn.qkv_proj.forward_add_rmsnorm(self.input_layernorm, hidden, residual)
            hidden = self._attention_from_qkv(positions, qkv, residual, metadata)
        elif residual is None and type(attn).forward is LlamaAttention.forward:
            # The first layer (no residual yet): a plain norm, and the output projection's
            # all-reduce may still ride on the gate_up GEMV.
            residual = hidden
            qkv = attn.qkv_proj(self.input_layernorm(hidden))
            hidden = self._attention_from_qkv(positions, qkv, residual, metadata)
        else:
            if residual is None:
                residual = hidden
                hidden = self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            hidden = attn(positions, hidden, metadata)
        return self._mlp_block(hidden, residual)

    def _attention_from_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, residual: torch.Tensor,
                            metadata: AttentionMetadata) -> torch.Tensor | PendingAllReduce:
        """Attention from the QKV projection's output, its all-reduce left to the gate_up GEMV where
        it can ride on it."""
        mlp, o_proj = self.mlp, self.self_attn.o_proj
        # Quantised layers replace RowParallelLinear and defer nothing.
        defer = (type(mlp) is LlamaMLP and isinstance(o_proj, RowParallelLinear)
                 and o_proj.can_defer_reduce(residual, mlp.gate_up_proj, self.post_attention_layernorm, residual))
        return self.self_attn.forward_from_qkv(positions, qkv, metadata, defer_reduce=defer)

    def _mlp_block(self, hidden: torch.Tensor | PendingAllReduce,
                   residual: torch.Tensor) -> tuple[torch.Tensor | PendingAllReduce, torch.Tensor]:
        """Add + RMSNorm and the feed-forward block; the norm inside the gate_up GEMV where it can be
        (summing a pending all-reduce there), the down projection's all-reduce left to the next
        layer's QKV GEMV where it can ride on it."""
        mlp, norm = self.mlp, self.post_attention_layernorm
        if isinstance(hidden, PendingAllReduce):
            gate_up, residual = mlp.gate_up_proj.forward_add_rmsnorm_pending(norm, hidden, residual)
        elif type(mlp) is LlamaMLP and _can_fuse_add_rmsnorm(mlp.gate_up_proj, norm, hidden, residual):
            gate_up, residual = mlp.gate_up_proj.forward_add_rmsnorm(norm, hidden, residual)
        else:
            hidden, residual = norm(hidden, residual)
            return mlp(hidden), residual
        nxt = self.next_layer[0] if self.next_layer else None
        defer = (nxt is not None and gated_act_name(mlp.act) == "silu"
                 and mlp.down_proj.can_defer_reduce(residual, nxt.self_attn.qkv_proj, nxt.input_layernorm, residual,
                                                    gated=True))
        return mlp.forward_from_gate_up(gate_up, defer_reduce=defer), residual

    def make_mlp(self, config: dict[str, Any], layer_idx: int) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (subclasses return e.g. a mixture of experts)."""
        return LlamaMLP(config)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (this pipeline stage's share of them)."""

    def __init__(self, config: dict[str, Any], layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = first_stage_module(lambda: VocabParallelEmbedding(config["vocab_size"], config["hidden_size"]))
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        rope = rope_parameters(config)
        rotary_dim = int(head_dim * config.get("partial_rotary_factor", 1.0))
        max_position = max(config.get("max_position_embeddings", 2048), config.get("_max_model_len", 0))
        rotary = RotaryEmbedding(head_dim, rotary_dim, max_position, rope)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config["num_hidden_layers"], lambda i: layer_cls(config, rotary, i))
        # Where consecutive layers are plain Llama ones, a layer may hand the next its down
        # projection's output with the all-reduce still pending (LlamaDecoderLayer).
        stage = list(islice(self.layers, self.start_layer, self.end_layer))
        for layer, nxt in zip(stage, stage[1:]):
            if type(layer) is LlamaDecoderLayer and type(nxt) is LlamaDecoderLayer:
                layer.next_layer = (nxt,)  # a tuple: not registered as a submodule
        self.norm = last_stage_module(lambda: RMSNorm(config["hidden_size"], config["rms_norm_eps"]))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> the first layer's input [T, hidden]."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Token ids [T] at positions [T] -> final hidden states [T, hidden]; on a pipeline stage
        other than the first, start from the previous stage's `intermediate_tensors`, and on one
        other than the last, return this stage's."""
        if intermediate_tensors is None:
            hidden, residual = self.embed(input_ids), None
        else:
            hidden, residual = intermediate_tensors["hidden"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden, residual = layer(positions, hidden, residual, metadata)
        if not is_last_pp_rank():
            return {"hidden": hidden, "residual": residual}
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM: hidden states from the model, logits from the LM head."""

    decoder_layer_cls: type[nn.Module] = LlamaDecoderLayer
    model_cls: type[nn.Module] = LlamaModel
    # What a pipeline stage hands the next one (models/pipeline.py).
    intermediate_keys: tuple[str, ...] = ("hidden", "residual")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, self.decoder_layer_cls)
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        self.lm_head = last_stage_module(lambda: ParallelLMHead(config["vocab_size"], config["hidden_size"]))
        if self.tie_word_embeddings and is_first_pp_rank() and is_last_pp_rank():
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Final hidden states for every token of the flat batch (a pipeline stage other than
        the last: its activations for the next stage)."""
        return self.model(input_ids, positions, metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Vocabulary logits for the selected hidden states [N, hidden] -> [N, vocab]; with
        `gather=False` this rank's slice of the vocabulary (ParallelLMHead.compute_logits)."""
        return self.lm_head.compute_logits(hidden, gather)

    def attention_layers(self) -> list[Attention]:
        """This stage's Attention modules in layer order (the runner binds one KV cache to each)."""
        return [layer.self_attn.attn for layer in self.model.layers if not isinstance(layer, PPMissingLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors named as in Hugging Face; returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            name = tied_embedding_target(name, "model.embed_tokens.weight", self.tie_word_embeddings)
            if is_missing_parameter(name, self):
                continue  # another pipeline stage's
            for ckpt_part, param_part, shard_id in _STACKED_PARAMS:
                if ckpt_part in name:
                    target = name.replace(ckpt_part, param_part)
                    param = params[target]
                    param.weight_loader(param, tensor, shard_id)
                    break
            else:
                target = name
                if target not in params:
                    raise ValueError(f"Checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}.")
                load_tensor(params[target], tensor, name)
            loaded.add(target)
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded
