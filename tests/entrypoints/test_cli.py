"""The `pagedllm` command line on the embedded model."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import requires_embedded_model

pytestmark = requires_embedded_model


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_completes_a_prompt_with_the_embedded_model():
    result = _run("generate", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_streams_an_answer_per_line_of_input():
    result = _run("chat", "--max-tokens", "32", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_missing_model_is_a_clear_error_not_a_traceback(tmp_path):
    result = _run("generate", "hi", "--model", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr
