"""The auxiliary endpoints: /v1/models, /health, /version, /tokenize, /detokenize, /metrics."""

from __future__ import annotations

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, MODEL_ALIAS, MODEL_NAME

pytestmark = requires_embedded_model


def test_models_lists_every_served_name_with_max_model_len(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME, MODEL_ALIAS]
    for card in http.get("/v1/models").json()["data"]:
        assert card["object"] == "model" and card["owned_by"] and isinstance(card["created"], int)
        assert card["max_model_len"] == MAX_MODEL_LEN


def test_health_and_version(http):
    import pagedllm

    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": pagedllm.__version__}


def test_tokenize_and_detokenize_round_trip(http):
    tokenized = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) > 0
    assert tokenized["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hello world"}]}).json()
    assert chat["count"] > tokenized["count"]  # the template adds role markers
    bad = http.post("/detokenize", json={"tokens": [10**8]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics_expose_the_pagedllm_families(http):
    text = http.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket"):
        assert f"pagedllm:{name}" in text, name
