"""Building the engine's hand-written CUDA kernels (sm_90a) with torch's C++ extension loader."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)


def load_extension(name: str, source: Path, what: str, headers: Sequence[Path] = ()) -> ModuleType | None:
    """Compile (or take from ~/.cache/torch_extensions) the extension `name` from `source`.

    `headers`: the files `source` includes from beside it. Their contents' hash goes into the
    build flags, so that a changed header rebuilds the extension even where the build's own
    dependency tracking is off (torch rebuilds when a source or a flag changes).
    Returns None, with a warning naming `what` falls back, when it cannot be built here (no
    nvcc, no headers, a compiler error): every caller keeps a Triton path.
    """
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]
        if headers:
            digest = hashlib.sha256(b"".join(path.read_bytes() for path in headers)).hexdigest()[:16]
            flags.append(f"-DPAGEDLLM_HEADERS_HASH=0x{digest}")
        return load(name=name, sources=[str(source)], extra_cuda_cflags=flags, verbose=False)
    except Exception as exc:  # noqa: BLE001 - no nvcc, no headers, a compiler error: fall back
        logger.warning("%s unavailable (build failed: %s); the Triton kernels serve", what, exc)
        return None
