"""Kernel tests run the Triton kernels in the interpreter on CPU unless told otherwise.

TRITON_INTERPRET must be set before triton is first imported: `triton.jit` reads it when a
kernel is defined. Set TRITON_INTERPRET=0 on a CUDA machine to run the same tests on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
