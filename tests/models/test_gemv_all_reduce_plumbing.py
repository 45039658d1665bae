"""The Llama decoder layer's hand-off of pending all-reduces (LlamaDecoderLayer, PendingAllReduce).

On two GPUs the all-reduces after the O and down projections ride on the CUDA GEMVs around them
(layers/cuda_gemv.py; its kernel test checks the bits on a GPU). What the model code must get
right, which CI can check on the CPU: which projections leave their all-reduce pending, that
every pending output is consumed exactly once by the add + RMSNorm projection after it (the next
layer's QKV for the down projection, never the final norm), and that the result is the plain
path's. Here the kernels' three hooks are replaced by PyTorch ones doing the same arithmetic, so
fp32 greedy tokens must be exactly the plain path's.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from pagedllm import LLM, SamplingParams

from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import ColumnParallelLinear, PendingAllReduce, RowParallelLinear
from tests.models.tiny_models import build_tiny_model, random_prompts

ENGINE_ARGS = dict(enforce_eager=True, max_model_len=96, num_gpu_blocks_override=16)


def _emulate_exchange(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Route one-token steps through the pending-all-reduce path with PyTorch stand-ins for the
    CUDA hooks; returns the counts of pushes and pulls."""
    counts = {"push": 0, "pull": 0}

    def can_fuse_add_rmsnorm(self, norm, hidden, residual):  # the fused add + RMSNorm form
        return residual is not None and type(norm) is RMSNorm and hidden.shape[0] == 1

    def forward_add_rmsnorm(self, norm, hidden, residual):
        normed, residual = norm.forward_native(hidden, residual)
        return self.forward_native(normed), residual

    def can_defer_reduce(self, sample, reader, norm, residual, gated=False):
        return sample.shape[0] == 1 and isinstance(reader, ColumnParallelLinear) and type(norm) is RMSNorm

    def forward_deferred(self, x, act=None):
        counts["push"] += 1
        if act == "silu":
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        return PendingAllReduce(self.forward_native(x), (*x.shape[:-1], self.weight.shape[0]))

    def forward_add_rmsnorm_pending(self, norm, hidden, residual):
        assert isinstance(hidden, PendingAllReduce) and hidden.site.shape == hidden.shape
        counts["pull"] += 1
        return forward_add_rmsnorm(self, norm, hidden.site, residual)

    monkeypatch.setattr(ColumnParallelLinear, "can_fuse_add_rmsnorm", can_fuse_add_rmsnorm)
    monkeypatch.setattr(ColumnParallelLinear, "forward_add_rmsnorm", forward_add_rmsnorm)
    monkeypatch.setattr(ColumnParallelLinear, "forward_add_rmsnorm_pending", forward_add_rmsnorm_pending)
    monkeypatch.setattr(RowParallelLinear, "can_defer_reduce", can_defer_reduce)
    monkeypatch.setattr(RowParallelLinear, "forward_deferred", forward_deferred)
    return counts


def _greedy(path: str, prompts: list[list[int]], max_tokens: int, counts: dict[str, int] | None = None,
            ) -> list[list[int]]:
    """Each prompt's greedy tokens, one request at a time (one-token steps); `counts` are zeroed
    once the engine is up, so they count the requests' forwards only."""
    with LLM(path, skip_tokenizer_init=True, **ENGINE_ARGS) as llm:
        if counts is not None:
            counts.update(push=0, pull=0)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
                for p in prompts]


def test_pending_all_reduces_are_consumed_once_and_give_the_plain_tokens(tmp_path, monkeypatch):
    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    prompts = random_prompts([7, 1], seed=5)  # a one-token prompt: its prefill takes the path too
    max_tokens = 6
    expected = _greedy(str(tmp_path), prompts, max_tokens)
    counts = _emulate_exchange(monkeypatch)
    assert _greedy(str(tmp_path), prompts, max_tokens, counts) == expected
    # One-token forwards: the 7-token prompt's 5 decodes, the 1-token prompt's prefill and 5
    # decodes. In each, every O projection (the first layer's too: its gate_up GEMV adds the
    # embedding as the residual) and every down projection but the last layer's (the final norm
    # takes it, reduced) leave their all-reduce pending: 2 * layers - 1 of them.
    layers = 2
    assert counts["push"] == counts["pull"] == (5 + 6) * (2 * layers - 1)
