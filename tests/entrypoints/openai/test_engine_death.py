"""When the engine-core process dies, pending requests fail with a clear error and /health turns 503."""

from __future__ import annotations

import json
import os
import signal

import httpx

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import start_server, stop_server

pytestmark = requires_embedded_model


def _engine_core_pid(server_pid: int) -> int:
    """The spawned engine-core child of the server (not multiprocessing's resource tracker)."""
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            return pid
    raise AssertionError(f"No engine-core child among {children}.")


def test_killing_the_engine_core_fails_pending_requests_and_health():
    server = start_server(["--served-model-name", "doomed"])
    try:
        body = {"prompt": "Tell me a long story.", "max_tokens": 900, "stream": True, "ignore_eos": True}
        events = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if not events:
                        os.kill(_engine_core_pid(server.proc.pid), signal.SIGKILL)
                    events.append(line[len("data: "):])
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert "engine core" in error["message"] and "exit" in error["message"]
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            refused = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"]
    finally:
        stop_server(server)
