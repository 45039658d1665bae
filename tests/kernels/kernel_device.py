"""Where the Triton kernel tests run: on CUDA with TRITON_INTERPRET=0, else on the CPU under the
interpreter (conftest.py sets TRITON_INTERPRET=1 unless told otherwise)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device("cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu")


def skip_module_unless_kernels_run() -> None:
    """Skip the calling test module where the kernels can run neither on CUDA nor interpreted."""
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without CUDA the Triton kernels run only under TRITON_INTERPRET=1", allow_module_level=True)
