"""Engine flags of this session's optimisations: each can be switched off, and the defaults."""

from __future__ import annotations

import argparse

import pytest

from pagedllm.config import EngineArgs, create_engine_config
from tests.models.tiny_models import build_tiny_model


def _parse(*flags: str) -> EngineArgs:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    return EngineArgs.from_cli_args(parser.parse_args(list(flags)))


def test_cli_flags_reach_the_engine_config(tmp_path):
    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    default = create_engine_config(_parse("--model", str(tmp_path), "--device", "cpu"))
    # On the CPU async scheduling is off unless asked (nothing to overlap); custom all-reduce on.
    assert not default.scheduler_config.async_scheduling
    assert not default.parallel_config.disable_custom_all_reduce
    assert default.model_config.use_fused_kernels
    chosen = create_engine_config(_parse("--model", str(tmp_path), "--device", "cpu", "--async-scheduling",
                                         "--disable-custom-all-reduce", "--no-fused-kernels"))
    assert chosen.scheduler_config.async_scheduling
    assert chosen.parallel_config.disable_custom_all_reduce
    assert not chosen.model_config.use_fused_kernels
    off = create_engine_config(_parse("--model", str(tmp_path), "--device", "cpu", "--no-async-scheduling"))
    assert not off.scheduler_config.async_scheduling


def test_prefill_graph_token_limit_is_capped_by_the_step_budget_and_checked(tmp_path):
    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    base = ("--model", str(tmp_path), "--device", "cpu")
    assert create_engine_config(_parse(*base)).cuda_graph_max_prefill_tokens == 2048
    small_steps = create_engine_config(_parse(*base, "--max-num-batched-tokens", "96"))
    assert small_steps.cuda_graph_max_prefill_tokens == 96  # no graph larger than any step
    assert create_engine_config(_parse(*base, "--cuda-graph-max-prefill-tokens", "0")).cuda_graph_max_prefill_tokens == 0
    with pytest.raises(ValueError, match="cuda_graph_max_prefill_tokens must be >= 0"):
        create_engine_config(_parse(*base, "--cuda-graph-max-prefill-tokens", "-1"))
