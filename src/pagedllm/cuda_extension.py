"""Building the engine's hand-written CUDA kernels (sm_90a) with torch's C++ extension loader."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)


def load_extension(name: str, source: Path, what: str) -> ModuleType | None:
    """Compile (or take from ~/.cache/torch_extensions) the extension `name` from `source`.

    Returns None, with a warning naming `what` falls back, when it cannot be built here (no
    nvcc, no headers, a compiler error): every caller keeps a Triton path.
    """
    try:
        from torch.utils.cpp_extension import load

        return load(name=name, sources=[str(source)],
                    extra_cuda_cflags=["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"],
                    verbose=False)
    except Exception as exc:  # noqa: BLE001 - no nvcc, no headers, a compiler error: fall back
        logger.warning("%s unavailable (build failed: %s); the Triton kernels serve", what, exc)
        return None
