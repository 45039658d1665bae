"""Kernel tests (Triton under the interpreter on CPU, CUDA kernels on a GPU)."""
