"""Lifecycle: readiness while loading, the SIGTERM drain and its timeout, and the exit after engine death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import (
    MODEL_NAME,
    RunningServer,
    engine_core_pid,
    start_tiny_server,
    stop_server,
)

pytestmark = requires_embedded_model

BOUND_S = 120  # how long any wait here may take before the test fails instead of hanging


def _stream_events(url: str, body: dict, started: threading.Event, events: list[str]) -> None:
    """Collect the data events of one streamed completion; `started` is set after the first."""
    with httpx.Client(base_url=url, timeout=BOUND_S) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()


def _start_streams(server: RunningServer, num: int, max_tokens: int) -> tuple[list[threading.Thread], list[list[str]]]:
    body = {"model": MODEL_NAME, "prompt": "Count with me:", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    events: list[list[str]] = [[] for _ in range(num)]
    started = [threading.Event() for _ in range(num)]
    threads = [threading.Thread(target=_stream_events, args=(server.url, body, started[i], events[i]), daemon=True)
               for i in range(num)]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(BOUND_S), "a stream never started"
    return threads, events


def _wait_for_status(server: RunningServer, status: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/ready", timeout=5).json()["status"] == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"/ready never said {status!r}")


def _exit_code(server: RunningServer) -> int:
    try:
        return server.proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError(f"the server did not exit:\n{server.log()[-3000:]}") from None


def test_sigterm_drains_the_streams_in_flight_refuses_new_ones_and_exits_0(tiny_model_dir):
    server = start_tiny_server(tiny_model_dir, ["--shutdown-timeout", str(BOUND_S)])
    try:
        # It answered probes while the model loaded, and said so.
        assert server.readiness[0] == "loading" and server.readiness[-1] == "ready", server.readiness
        # Long enough that the probes below happen while they run, even on a fast machine.
        num_streams, max_tokens = 4, 200
        threads, events = _start_streams(server, num_streams, max_tokens)
        server.proc.send_signal(signal.SIGTERM)
        _wait_for_status(server, "draining")
        assert httpx.get(f"{server.url}/health").status_code == 200  # alive: still finishing work
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        for thread in threads:
            thread.join(BOUND_S)
        for stream in events:  # every stream in flight ran to its end
            assert stream[-1] == "[DONE]"
            assert json.loads(stream[-2])["usage"]["completion_tokens"] == max_tokens
            assert not any('"error"' in event for event in stream)
        assert _exit_code(server) == 0
        log = server.log()
        assert "Draining: 4 request(s) in flight" in log and "Traceback" not in log
    finally:
        stop_server(server)


def test_sigterm_aborts_what_outlives_the_shutdown_timeout_and_still_exits_0(tiny_model_dir):
    # 3,500 tokens take seconds even for the tiny model; the timeout is one second.
    server = start_tiny_server(tiny_model_dir, ["--shutdown-timeout", "1"], max_model_len=4096)
    try:
        threads, events = _start_streams(server, 2, 3500)
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(BOUND_S)
        for stream in events:
            assert stream[-1] == "[DONE]"
            error = json.loads(stream[-2])["error"]
            assert error["code"] == "server_shutting_down" and "--shutdown-timeout" in error["message"]
        assert _exit_code(server) == 0
        assert "aborted 2 request(s)" in server.log()
    finally:
        stop_server(server)


def test_a_killed_engine_core_turns_health_503_and_the_server_exits_non_zero(tiny_model_dir):
    server = start_tiny_server(tiny_model_dir, [], max_model_len=4096)
    try:
        threads, events = _start_streams(server, 1, 3500)
        os.kill(engine_core_pid(server.proc.pid), signal.SIGKILL)
        threads[0].join(BOUND_S)
        assert events[0][-1] == "[DONE]"
        error = json.loads(events[0][-2])["error"]
        assert "engine core" in error["message"] and "Traceback" not in error["message"]
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        ready = httpx.get(f"{server.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json() == {"status": "dead"}
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503
        assert _exit_code(server) != 0  # instead of serving errors forever
    finally:
        stop_server(server)
