"""Admission control and the per-request limits: a full queue gets 503 + Retry-After, requests past
--request-timeout are aborted (504) and freed, bodies past --max-request-body-bytes get 413; plus
CORS with --allowed-origins and prompt logging with --log-requests."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, start_tiny_server, stop_server
from tests.entrypoints.openai.test_concurrency import metric_values, wait_until_idle

pytestmark = requires_embedded_model

REQUEST_TIMEOUT_S = 10
BODY_LIMIT = 64 * 1024
ALLOWED_ORIGIN = "http://good.example"
MARKER = "logged-prompt-marker-91c2"
BOUND_S = 120
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Tens of thousands of tokens: even at ~1 ms a step on an idle machine these requests run for 30 s
# or more, so they cannot finish before the 10 s request timeout.
MAX_MODEL_LEN = 32768
LONG = {"model": MODEL_NAME, "prompt": f"{MARKER} go on", "max_tokens": 30000, "ignore_eos": True}


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir: str):
    """Two running sequences, two waiting, a 10 s request timeout, a 64 KiB body limit."""
    server = start_tiny_server(tiny_model_dir, [
        "--max-num-seqs", "2", "--max-waiting-requests", "2", "--request-timeout", str(REQUEST_TIMEOUT_S),
        "--max-request-body-bytes", str(BODY_LIMIT), "--allowed-origins", ALLOWED_ORIGIN, "--log-requests",
        "--api-key", API_KEY], max_model_len=MAX_MODEL_LEN)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def http(limited_server):
    """A raw client with the API key."""
    with httpx.Client(base_url=limited_server.url, headers=AUTH, timeout=BOUND_S) as c:
        yield c


def _wait_for_metric(http: httpx.Client, name: str, value: float) -> None:
    deadline = time.monotonic() + BOUND_S
    while metric_values(http)[(f"pagedllm:{name}", ())] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def _stream_in_thread(url: str, events: list[str]) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=BOUND_S) as client:
            with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
                events.append(str(response.status_code))
                events.extend(line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_full_queue_answers_503_with_retry_after_and_timed_out_requests_are_aborted(limited_server, http):
    before = wait_until_idle(http)
    # A non-streamed request and a stream fill the running batch (max_num_seqs 2) ...
    blocking: dict[str, httpx.Response] = {}
    thread_a = threading.Thread(target=lambda: blocking.update(a=http.post("/v1/completions", json=LONG)),
                                daemon=True)
    thread_a.start()
    streams = [[] for _ in range(3)]
    threads = [_stream_in_thread(limited_server.url, streams[0])]
    _wait_for_metric(http, "num_requests_running", 2)
    # ... two more streams fill the waiting queue (--max-waiting-requests 2) ...
    threads += [_stream_in_thread(limited_server.url, streams[i]) for i in (1, 2)]
    _wait_for_metric(http, "num_requests_waiting", 2)
    # ... and the next request is refused at once instead of queueing.
    refused = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "server_overloaded" and "--max-waiting-requests" in error["message"]

    # Every one of them runs past --request-timeout: aborted, with a 504 or a stream error event.
    thread_a.join(BOUND_S)
    response_a = blocking["a"]
    assert response_a.status_code == 504 and response_a.json()["error"]["code"] == "request_timeout"
    for thread, events in zip(threads, streams):
        thread.join(BOUND_S)
        assert events[0] == "200" and events[-1] == "[DONE]"
        stream_error = json.loads(events[-2])["error"]
        assert stream_error["code"] == "request_timeout" and "--request-timeout" in stream_error["message"]
    after = wait_until_idle(http)
    assert after[("pagedllm:kv_cache_usage_perc", ())] == 0
    abort = ("pagedllm:request_success_total", (("finished_reason", "abort"),))
    assert after[abort] - before.get(abort, 0) == 4
    # Once freed, the server serves again.
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


def test_a_request_larger_than_the_server_ever_admits_is_400(http):
    response = http.post("/v1/completions", json={**LONG, "n": 5, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_bodies_over_the_limit_are_413_and_under_it_served(http):
    too_large = http.post("/v1/completions", json={**LONG, "prompt": "x" * BODY_LIMIT})
    assert too_large.status_code == 413 and str(BODY_LIMIT) in too_large.json()["error"]["message"]
    fits = http.post("/v1/completions", json={**LONG, "prompt": "hello " * 1000, "max_tokens": 2})
    assert fits.status_code == 200


def test_cors_answers_only_the_allowed_origin(limited_server, http):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{limited_server.url}/v1/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.options(f"{limited_server.url}/v1/completions",
                          headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # Even a 401 carries the header for the allowed origin (so a browser can read the error).
    unauthorized = httpx.get(f"{limited_server.url}/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_log_requests_puts_prompts_in_the_log(limited_server, http):
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
    assert MARKER in limited_server.log()
