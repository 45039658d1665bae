"""Engine flags of this session's optimisations: each can be switched off, and the defaults."""

from __future__ import annotations

import argparse

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
