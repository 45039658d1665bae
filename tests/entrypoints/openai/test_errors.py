"""Every rejected request gets OpenAI's error shape and the right status: 400, 401, 404."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME

pytestmark = requires_embedded_model

COMPLETION = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def _assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param
        assert param.split(".")[0] in error["message"], error["message"]
    return error


@pytest.mark.parametrize("change, param", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 8}, "min_tokens"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logit_bias": {"not-a-token": 1.0}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1.0}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"suffix": "x"}, "suffix"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": 5}, "cache_salt"),
    ({"best_of": 2}, "best_of"),
    ({"use_beam_search": True, "n": 3, "best_of": 2}, "best_of"),
    ({"use_beam_search": True, "logprobs": 2}, "logprobs"),
    ({"use_beam_search": True, "stop": ["x"]}, "stop"),
    ({"use_beam_search": True, "max_tokens": 0}, "max_tokens"),
    ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
])
def test_invalid_completion_parameters_are_400_naming_the_parameter(http, change, param):
    _assert_error(http.post("/v1/completions", json={**COMPLETION, **change}), 400, param)


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stream_options": {"include_usage": True}, "stream": False}, "stream_options"),
    ({"temperature": -0.5}, "temperature"),
    ({"use_beam_search": True, "logprobs": True}, "logprobs"),
    ({"use_beam_search": True, "n": 0}, "n"),
])
def test_invalid_chat_parameters_are_400_naming_the_parameter(http, change, param):
    _assert_error(http.post("/v1/chat/completions", json={**CHAT, **change}), 400, param)


def test_prompt_plus_max_tokens_beyond_max_model_len_is_400(http):
    error = _assert_error(http.post("/v1/completions", json={**COMPLETION, "max_tokens": MAX_MODEL_LEN}), 400,
                          "max_tokens")
    assert str(MAX_MODEL_LEN) in error["message"] and error["code"] == "context_length_exceeded"
    too_long = {**COMPLETION, "prompt": [1] * MAX_MODEL_LEN}
    _assert_error(http.post("/v1/completions", json=too_long), 400, "prompt")
    chat = {**CHAT, "max_tokens": MAX_MODEL_LEN}
    _assert_error(http.post("/v1/chat/completions", json=chat), 400, "max_tokens")


@pytest.mark.parametrize("prompt", [[1, 2, 10**7], [[5, 6], [-1]]])
def test_token_ids_outside_the_vocabulary_are_400(http, prompt):
    error = _assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 400, "prompt")
    assert "vocabulary" in error["message"]


def test_malformed_json_is_400(http):
    response = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    _assert_error(response, 400)


def test_unknown_model_is_404(http, client):
    error = _assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-17"}), 404, "model")
    assert "gpt-17" in error["message"]
    _assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"}), 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=1)


def test_unknown_route_is_404_in_the_openai_shape(http):
    _assert_error(http.get("/v1/nothing-here"), 404)


def test_api_key_is_required_on_v1_only(server):
    url = server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        error = _assert_error(httpx.post(f"{url}/v1/completions", json=COMPLETION, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
        _assert_error(httpx.get(f"{url}/v1/models", headers=headers), 401)
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200
    bad_client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
