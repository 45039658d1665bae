"""Specification of the CUDA extensions' build (cuda_extension.py) and packaging, on the CPU.

The kernels themselves are checked on a GPU (test_cuda_gemv.py, test_cuda_decode.py); here,
without compiling anything: a header's contents reach the build flags (so a changed header
rebuilds the kernel), a failed build falls back instead of raising, and the wheel ships every
CUDA file the engine compiles at run time.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch.utils.cpp_extension

from pagedllm import cuda_extension

PACKAGE = Path(cuda_extension.__file__).parent


def _flags_for(monkeypatch: pytest.MonkeyPatch, source: Path, headers: tuple[Path, ...]) -> list[str]:
    seen: dict[str, Any] = {}

    def fake_load(**kwargs: Any) -> str:
        seen.update(kwargs)
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert cuda_extension.load_extension("x", source, "test kernel", headers) == "module"
    assert seen["sources"] == [str(source)]
    return seen["extra_cuda_cflags"]


def test_a_changed_header_changes_the_build_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, header = tmp_path / "k.cu", tmp_path / "k.cuh"
    source.write_text('#include "k.cuh"\n')
    header.write_text("constexpr int kA = 1;\n")
    plain = _flags_for(monkeypatch, source, ())
    first = _flags_for(monkeypatch, source, (header,))
    assert _flags_for(monkeypatch, source, (header,)) == first  # stable while the header is
    header.write_text("constexpr int kA = 2;\n")
    second = _flags_for(monkeypatch, source, (header,))
    assert first != second and set(plain) < set(first) and set(plain) < set(second)
    assert "-gencode=arch=compute_90a,code=sm_90a" in plain


def test_a_failed_build_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_load(**kwargs: Any) -> None:
        raise RuntimeError("nvcc: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    assert cuda_extension.load_extension("x", tmp_path / "k.cu", "test kernel") is None


def test_the_package_ships_every_cuda_file() -> None:
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["pagedllm"]
    cuda_files = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.suffix in (".cu", ".cuh")]
    assert cuda_files, "no CUDA sources found"
    missing = [f for f in cuda_files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
