"""The per-rank memory plan of a 70B-class model (Llama-3.1-70B dimensions) at TP=1, 4 and 8."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagedllm.distributed import get_tp_size
from pagedllm.worker.memory_plan import plan_rank_memory

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs", "llama-3.1-70b", "config.json")
H100_BYTES = 80 * 10**9


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CONFIG) as f:
        return json.load(f)


def test_70b_weights_split_evenly_and_kv_heads_per_rank(config):
    plans = {tp: plan_rank_memory(config, torch.bfloat16, tp) for tp in (1, 4, 8)}
    assert get_tp_size() == 1  # planning leaves this process's parallel state alone
    total = plans[1].weight_bytes
    assert 141.0e9 < total < 141.2e9  # 70.55 B parameters in bf16
    for tp in (4, 8):
        # Only the norms are replicated: each rank holds 1/tp of the rest.
        assert total / tp <= plans[tp].weight_bytes < total / tp * 1.001
        assert plans[tp].num_kv_heads_per_rank == 8 // tp
        assert plans[tp].kv_bytes_per_token == 2 * 80 * (8 // tp) * 128 * 2


def test_70b_fits_four_and_eight_h100s_with_room_for_long_requests(config):
    activation = 4 * 10**9  # generous: the profiled peak at 8192 batched tokens is well below
    tokens = {tp: plan_rank_memory(config, torch.bfloat16, tp).kv_cache_tokens(H100_BYTES, 0.9, activation)
              for tp in (4, 8)}
    assert tokens[4] > 131072  # at least one request of the model's full 128k context
    assert tokens[8] > 3 * tokens[4]  # half the weights per rank (more room) and half the KV bytes per token
    assert plan_rank_memory(config, torch.bfloat16, 1).kv_cache_tokens(H100_BYTES, 0.9, activation) == 0
