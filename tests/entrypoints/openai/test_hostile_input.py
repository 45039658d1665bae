"""Hostile input: hand-written nasty requests and a fuzzer over the server's own OpenAPI schema.

Every case must be answered with a 4xx whose message names the problem, never a 5xx, and none
of the prompts may reach the server log (the server runs without --log-requests).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import MODEL_NAME, start_tiny_server, stop_server

pytestmark = requires_embedded_model

# Small limits keep every generated request short: at most 8 + 8 sequences of 64 tokens.
MAX_MODEL_LEN = 64
SERVER_ARGS = ["--max-num-seqs", "8", "--max-waiting-requests", "8"]
# Appears in every prompt sent here; the log must never contain it.
MARKER = "hostile-marker-7f3a"
# Generated cases per operation and generation mode (valid / invalid bodies).
FUZZ_EXAMPLES = 40

COMPLETION = {"model": MODEL_NAME, "prompt": f"{MARKER} hello", "max_tokens": 4}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"{MARKER} hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def hostile_server(tiny_model_dir: str):
    """A tiny-model server with small limits and no --log-requests."""
    server = start_tiny_server(tiny_model_dir, SERVER_ARGS, max_model_len=MAX_MODEL_LEN)
    yield server
    log = server.log()
    stop_server(server)
    assert MARKER not in log, "a prompt reached the server log without --log-requests"


@pytest.fixture(scope="module")
def http(hostile_server):
    """A raw client for the hostile-input server."""
    with httpx.Client(base_url=hostile_server.url, timeout=120) as c:
        yield c


def _error(response: httpx.Response, status: int, *words: str) -> dict:
    """The OpenAI error body of a response with `status`, whose message holds every word."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    assert "Traceback" not in error["message"]
    return error


def _post_raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("content, words", [
    (b'{"prompt": "hi", ', ["JSON"]),
    (b"not json at all", ["JSON"]),
    (b"[" * 100_000, ["JSON"]),  # nested far beyond the parser's depth
    (b'{"prompt": "\xff\xfe hi"}', ["UTF-8"]),
    (b'{"prompt": "\\ud800 hi", "max_tokens": 2}', ["prompt", "surrogate"]),
    (b'{"prompt": "hi", "temperature": NaN}', ["temperature", "finite"]),
    (b'{"prompt": "hi", "top_p": Infinity}', ["top_p", "finite"]),
    (b'{"prompt": "hi", "max_tokens": 1e999}', ["max_tokens"]),
])
def test_malformed_bodies_are_400_naming_the_problem(http, content, words):
    error = _error(_post_raw(http, "/v1/completions", content), 400, *words)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("change, status, words", [
    ({"prompt": 5}, 400, ["prompt"]),
    ({"max_tokens": "many"}, 400, ["max_tokens"]),
    ({"n": "two"}, 400, ["n"]),
    ({"stream": "yes please"}, 400, ["stream"]),
    ({"logit_bias": [1, 2]}, 400, ["logit_bias"]),
    ({"n": 10**9}, 400, ["n"]),
    ({"n": 100}, 400, ["sequences"]),  # within the cap of 128, beyond what the server admits
    ({"best_of": 10**6, "use_beam_search": True}, 400, ["best_of"]),
    ({"max_tokens": 10**30}, 400, ["max_tokens", "context length"]),
    ({"max_tokens": -5}, 400, ["max_tokens"]),
    ({"logprobs": 10**9}, 400, ["logprobs"]),
    ({"logit_bias": {str(i): 1.0 for i in range(5000)}}, 400, ["logit_bias"]),
    ({"logit_bias": {"5": 1e6}}, 400, ["logit_bias", "[-100, 100]"]),
    ({"logit_bias": {"-1": 1.0}}, 400, ["logit_bias"]),
    ({"logit_bias": {"123456789": 1.0}}, 400, ["logit_bias", "vocabulary"]),
    ({"prompt": [1, 2, 49152]}, 400, ["prompt", "vocabulary"]),
    ({"prompt": [[5], [-3]]}, 400, ["prompt", "vocabulary"]),
    ({"stop_token_ids": [10**12]}, 400, ["stop_token_ids", "vocabulary"]),
    ({"seed": 2**80}, 400, ["seed"]),
    ({"stop": ["x"] * 1000}, 400, ["stop"]),
    ({"prompt": "word " * 200_000}, 400, ["prompt", "context length"]),  # 1 MB: under the body limit
])
def test_hostile_completion_parameters_are_4xx_naming_them(http, change, status, words):
    _error(http.post("/v1/completions", json={**COMPLETION, **change}), status, *words)


@pytest.mark.parametrize("change, words", [
    ({"messages": "hello"}, ["messages"]),
    ({"messages": [{"role": "user", "content": 7}]}, ["messages"]),
    ({"chat_template": "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"},
     ["chat_template"]),
    ({"top_logprobs": 10**9, "logprobs": True}, ["top_logprobs"]),
    ({"n": 129}, ["n"]),
    ({"max_completion_tokens": 10**20}, ["max_completion_tokens", "context length"]),
])
def test_hostile_chat_parameters_are_400_naming_them(http, change, words):
    _error(http.post("/v1/chat/completions", json={**CHAT, **change}), 400, *words)


@pytest.mark.parametrize("prompt", [f"{MARKER} " + "x" * (10 * 1024 * 1024), [7] * (3 * 1024 * 1024)],
                         ids=["text", "token-ids"])
def test_a_10_mb_prompt_is_413_naming_the_limit(http, prompt):
    error = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 413,
                   "bytes", "--max-request-body-bytes")
    assert error["code"] == "request_too_large"


def test_a_10_mb_chunked_body_without_content_length_is_413(http):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * (1024 * 1024)
        yield b'"}'

    _error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413,
           "--max-request-body-bytes")


def test_the_server_still_serves_after_the_hostile_cases(http):
    response = http.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"


def test_cors_is_off_without_allowed_origins(http):
    response = http.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": "http://x"}).headers


def test_fuzzing_the_openapi_schema_finds_no_server_error(hostile_server, http):
    """Schemathesis generates valid and invalid requests for every operation of /openapi.json."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/ready"}
    counts = {"cases": 0}
    failures: list[str] = []

    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        for operation in operations:
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                counts["cases"] += 1
                response = case.call(base_url=hostile_server.url, timeout=120)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r:.300} -> "
                                    f"{response.status_code} {response.text[:300]}")

            try:
                run()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing invalid to send, e.g. GET /health
    print(f"\n[fuzz] {counts['cases']} generated cases over {len(operations)} operations, "
          f"{len(failures)} server errors")
    assert not failures, "\n".join(failures[:5])
    assert counts["cases"] >= FUZZ_EXAMPLES * 2  # the fuzzer really ran
    # And the server is still healthy and serving.
    assert http.get("/ready").json() == {"status": "ready"}
    assert json.loads(http.post("/v1/completions", json=COMPLETION).text)["usage"]["completion_tokens"] == 4
