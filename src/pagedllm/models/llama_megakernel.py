"""Every decoder layer of a one-token Llama decode step in one persistent CUDA kernel.

At batch 1 a decode step is a weight stream, and on H200s the time around the streams was what
kept tensor parallelism from paying: each of a layer's ~8 kernels (four GEMVs, attention, two
all-reduces, ...) starts 1.7-2.6 us after the previous one ends, ramps up and drains, and at
TP=2 the all-reduces and attention are each a boundary that cannot be overlapped
(docs/parallelism.md). `llama_megakernel.cu` removes the boundaries: one CTA per SM runs the
whole stack of layers, a producer warp streams every weight row the CTA owns into shared memory
without ever waiting for activations, and the consumer warps move from phase to phase on
counters in global memory. The all-reduces are rows pushed straight into every rank's buffer
over NVLink (symmetric memory) and summed, in rank order, by whoever reads them.

Serves the plain Llama decoder (LlamaForCausalLM: Llama, SmolLM, ...): bf16, head_dim 128,
full-head NeoX RoPE, no biases, no q/k norm, no sliding window, one pipeline stage, tensor
parallelism through symmetric memory, one decode token, int64 step metadata, sm_90+. Everything
else (and every step of more than one token) takes the layer-by-layer path, which stays the
oracle. Off by default (`PAGEDLLM_LLAMA_MEGAKERNEL=1` turns it on): on one H200 it measured 17-28%
slower than the layer path (docs/benchmarks.md, thirteenth session). Built on first
use with torch's extension loader (needs nvcc; cached); when the build fails, the ranks agree to
go without it.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from pagedllm import distributed
from pagedllm.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from pagedllm.models.llama import LlamaModel

logger = logging.getLogger(__name__)

ENV_VAR = "PAGEDLLM_LLAMA_MEGAKERNEL"
_SOURCE = Path(__file__).with_name("llama_megakernel.cu")
_HEAD_DIM = 128
_MAX_GROUP = 8
_MAX_WORLD = 8
_STAGE_BYTES = 32 * 1024
_PHASES = 5
_MAX_SPLITS = 16  # attention splits per kv head
# Tuned on one H200 (docs/benchmarks.md, thirteenth session): bulk copies in flight per CTA, and
# the share of each matrix's stages split statically (the rest go out through tickets).
AHEAD = 2
STATIC_SHARE = 0.8


def enabled_by_env() -> bool:
    """True when PAGEDLLM_LLAMA_MEGAKERNEL is set to anything but '', '0' or 'false' (off by default)."""
    return os.environ.get(ENV_VAR, "0").strip().lower() not in ("", "0", "false")


@functools.cache
def _module() -> ModuleType | None:
    """The compiled extension, or None when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        return load(name="pagedllm_llama_megakernel", sources=[str(_SOURCE)],
                    extra_cuda_cflags=["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"],
                    verbose=False)
    except Exception as exc:  # noqa: BLE001 - no nvcc, no headers, a compiler error: go without
        logger.warning("Llama decode megakernel unavailable (build failed: %s)", exc)
        return None


def unsupported_reason(model: LlamaModel) -> str | None:
    """Why the megakernel cannot run `model`'s layers (None: it can, KV caches permitting)."""
    from pagedllm.layers.layernorm import RMSNorm
    from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    if not enabled_by_env():
        return f"{ENV_VAR}=0"
    if distributed.get_pp_size() > 1:
        return "pipeline parallelism"
    if distributed.get_tp_size() > _MAX_WORLD:
        return f"more than {_MAX_WORLD} tensor-parallel ranks"
    if distributed.get_tp_size() > 1 and distributed.get_custom_all_reduce() is None:
        return "no symmetric memory between the ranks"
    layers = list(model.layers)
    if not layers:
        return "no layers"
    weight = layers[0].self_attn.qkv_proj.weight
    if not weight.is_cuda or torch.cuda.get_device_capability(weight.device)[0] < 9:
        return "needs an sm_90+ GPU"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (type(layer) is not LlamaDecoderLayer or type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP
                or type(attn.qkv_proj) is not QKVParallelLinear or type(attn.o_proj) is not RowParallelLinear
                or type(mlp.gate_up_proj) is not MergedColumnParallelLinear
                or type(mlp.down_proj) is not RowParallelLinear
                or type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm):
            return "not the plain Llama decoder layer"
        if type(mlp.act).__name__ != "SiluAndMul":
            return "activation other than SiLU"
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(proj.bias is not None for proj in projections):
            return "linear biases"
        tensors = [proj.weight for proj in projections]
        tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() or t.data_ptr() % 16 for t in tensors):
            return "weights not contiguous bf16"
        if attn.qk_norm or attn.attn.sliding_window is not None or attn.attn.logits_soft_cap is not None:
            return "q/k norm, sliding window or soft cap"
        if attn.head_dim != _HEAD_DIM or attn.num_heads % attn.num_kv_heads or \
                attn.num_heads // attn.num_kv_heads > _MAX_GROUP:
            return f"head_dim {attn.head_dim} / head grouping"
        rotary = attn.rotary
        if rotary.rotary_dim != rotary.head_dim or rotary.cos_cache.dtype != torch.float32:
            return "partial or non-fp32 rotary"
    hidden = layers[0].input_layernorm.weight.numel()
    inter = layers[0].mlp.down_proj.weight.shape[1]
    q_size = layers[0].self_attn.q_size
    if any(size % 8 or size * 2 > _STAGE_BYTES for size in (hidden, inter, q_size)):
        return "sizes the stage ring does not take"
    return None


class LlamaDecodeMegakernel:
    """The megakernel bound to one model's layers, KV caches and tensor-parallel group.

    Set up on the first step it serves (every rank at the same step: the symmetric buffers are
    a collective), which the engine's warm-up runs before any CUDA graph is captured.
    """

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.module: ModuleType | None = None
        self.failed = False
        self.ahead, self.static_share = AHEAD, STATIC_SHARE

    def applies(self, input_ids: torch.Tensor, metadata: AttentionMetadata) -> bool:
        """Whether this step is one it serves: one decode token with int64 metadata and bound caches."""
        if self.failed or input_ids.shape[0] != 1 or metadata.num_decodes != 1 or metadata.num_actual_tokens != 1:
            return False
        if any(t.dtype != torch.int64 for t in (metadata.slot_mapping, metadata.seq_lens, metadata.block_tables)):
            return False
        caches = [layer.self_attn.attn.kv_cache for layer in self.model.layers]
        return all(c.dim() == 5 and c.dtype == torch.bfloat16 and c.shape[-1] == _HEAD_DIM for c in caches)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor,
                 metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last layer's (hidden, residual) [1, hidden] from the embedding `hidden` [1, hidden];
        None when the kernel cannot be set up here (then never again: the caller goes layer by layer)."""
        if self.module is None and not self._set_up(hidden.device):
            return None
        attn0 = self.model.layers[0].self_attn
        cache = attn0.attn.kv_cache
        if positions.dtype != torch.int64:
            positions = positions.to(torch.int64)
        static_permille = round(self.static_share * 1000)
        if static_permille != self._static_permille:
            # A launch draws a fixed number of tickets per matrix for a given split: restart the
            # counters when it changes (benchmarks only; never inside a graph: a capture is
            # preceded by eager warm-up steps).
            self.tickets.zero_()
            self._static_permille = static_permille
        self.module.llama_decode(
            self.layer_table, len(self.model.layers), self.hidden, attn0.num_heads, attn0.num_kv_heads,
            self.inter, self.eps, attn0.attn.scale, hidden, self.hidden_out, self.residual_out, positions,
            metadata.slot_mapping, metadata.seq_lens, metadata.block_tables[0], cache.shape[2], cache.stride(1),
            cache.stride(2), cache.stride(3), attn0.rotary.cos_cache, attn0.rotary.sin_cache, self.qkv_words,
            self.part_words, self.attn_words, self.gate_up, self.reduce_ptrs, self.counter_ptrs, self.epoch,
            self.tickets, distributed.get_tp_rank(), self.grid, self.max_splits,
            static_permille, self.ahead, self.stamps)
        return self.hidden_out, self.residual_out

    def _set_up(self, device: torch.device) -> bool:
        module = _module()
        world = distributed.get_tp_size()
        if world > 1 and not distributed.all_tp_ranks_agree(module is not None, device):
            module = None
        if module is None:
            self.failed = True
            return False
        layers = list(self.model.layers)
        attn0, mlp0 = layers[0].self_attn, layers[0].mlp
        self.hidden = layers[0].input_layernorm.weight.numel()
        self.inter = mlp0.down_proj.weight.shape[1]
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        if any(float(norm.variance_epsilon) != self.eps for layer in layers
               for norm in (layer.input_layernorm, layer.post_attention_layernorm)):
            raise ValueError("the megakernel takes one RMSNorm epsilon for every layer")
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.grid = distributed.tp_min(sms, device) if world > 1 else sms
        num_heads, num_kv_heads = attn0.num_heads, attn0.num_kv_heads
        # attention: one CTA per (kv head, split)
        self.max_splits = min(_MAX_SPLITS, self.grid // num_kv_heads)
        if self.max_splits < 1:
            self.failed = True
            return False
        L, dtype = len(layers), torch.bfloat16
        rows = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            cache = attn.attn.kv_cache
            rows.append([attn.qkv_proj.weight.data_ptr(), attn.o_proj.weight.data_ptr(),
                         mlp.gate_up_proj.weight.data_ptr(), mlp.down_proj.weight.data_ptr(),
                         layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                         cache[0].data_ptr(), cache[1].data_ptr()])
        self.layer_table = torch.tensor(rows, dtype=torch.int64, device=device)
        self.hidden_out = torch.zeros(1, self.hidden, dtype=dtype, device=device)
        self.residual_out = torch.zeros(1, self.hidden, dtype=dtype, device=device)
        qkv_rows = attn0.q_size + 2 * attn0.kv_size
        # tagged words (llama_megakernel.cu): zero is never a launch's tag
        self.qkv_words = torch.zeros(L, qkv_rows, dtype=torch.int64, device=device)
        self.part_words = torch.zeros(L, num_heads, self.max_splits, _HEAD_DIM + 2, dtype=torch.int64, device=device)
        self.attn_words = torch.zeros(L, attn0.q_size, dtype=torch.int64, device=device)
        self.gate_up = torch.zeros(L, 2 * self.inter, dtype=dtype, device=device)
        self.epoch = torch.zeros(2, dtype=torch.int64, device=device)
        self.tickets = torch.zeros(4 * L, dtype=torch.int64, device=device)
        self._static_permille = round(self.static_share * 1000)
        self.stamps: torch.Tensor | None = None
        reduce_numel = L * 2 * world * self.hidden
        counter_numel = L * _PHASES
        if world > 1:
            comm = distributed.get_custom_all_reduce()
            self.reduce, self.reduce_ptrs = comm.symmetric_tensor(reduce_numel, dtype)
            self.counters, self.counter_ptrs = comm.symmetric_tensor(counter_numel, torch.int64)
        else:
            self.reduce = torch.zeros(reduce_numel, dtype=dtype, device=device)
            self.counters = torch.zeros(counter_numel, dtype=torch.int64, device=device)
            self.reduce_ptrs, self.counter_ptrs = [self.reduce.data_ptr()], [self.counters.data_ptr()]
        self.module = module
        logger.info("Llama decode megakernel: %d layers in one kernel per one-token step (%d CTAs, TP=%d).",
                    L, self.grid, world)
        return True

    def record_stamps(self, on: bool) -> None:
        """Per-CTA, per-layer global-timer stamps of each phase's start (benchmarks only)."""
        self.stamps = None
        if on and self.module is not None:
            self.stamps = torch.zeros(self.grid, len(self.model.layers), 16, dtype=torch.int64,
                                      device=self.hidden_out.device)
