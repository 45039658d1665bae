"""Shared fixtures: tiny random-weight models built locally from transformers configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """Keep torch to the CI machine's two threads so timings and numerics are stable."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
