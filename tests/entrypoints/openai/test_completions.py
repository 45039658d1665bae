"""POST /v1/completions through the official client: text, streaming, n > 1, logprobs, echo, stop, seeds, usage."""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import MODEL_ALIAS, MODEL_NAME, parallel

pytestmark = requires_embedded_model

PROMPT = "The capital of France is"


def _stream_texts(stream) -> tuple[dict[int, str], dict[int, list[str]], object]:
    """Concatenated text and every finish_reason per choice index, and the usage of the last chunk."""
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, finishes, usage


def test_completion_returns_text_usage_and_finish_reason(client, http):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.object == "text_completion" and response.model == MODEL_NAME
    [choice] = response.choices
    assert "Paris" in choice.text and choice.finish_reason == "length"
    num_prompt_tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert response.usage.prompt_tokens == num_prompt_tokens
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == num_prompt_tokens + 8


def test_greedy_results_equal_offline_generate_for_the_same_prompts(client, offline_llm):
    from pagedllm import SamplingParams

    prompts = [PROMPT, "def fibonacci(n):", "Water boils at", "My favourite colour is"]
    offline = offline_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    response = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=10, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [o.outputs[0].text for o in offline]
    assert [c.finish_reason for c in response.choices] == [o.outputs[0].finish_reason for o in offline]
    assert response.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in offline)


def test_the_served_alias_and_token_id_prompts_give_the_same_completion(client, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text, by_ids = parallel(
        lambda: client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0),
        lambda: client.completions.create(model=MODEL_ALIAS, prompt=[ids, ids], max_tokens=6, temperature=0))
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * by_text.usage.prompt_tokens


def test_stream_concatenates_to_the_non_streamed_result_with_one_finish_per_choice(client):
    kwargs = dict(model=MODEL_NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=8, n=2, temperature=0.8,
                  seed=11)
    full, (texts, finishes, usage) = parallel(
        lambda: client.completions.create(**kwargs),
        lambda: _stream_texts(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **kwargs)))
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: [c.finish_reason] for c in full.choices}
    assert usage.model_dump() == full.usage.model_dump()
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens


def test_n_samples_are_reproducible_with_a_seed_and_differ_between_seeds(client):
    def sample(seed: int):
        return lambda: client.completions.create(model=MODEL_NAME, prompt="List three random words:", n=3,
                                                 max_tokens=6, temperature=1.0, seed=seed,
                                                 extra_body={"ignore_eos": True})

    first, again, other = parallel(sample(1234), sample(1234), sample(99))
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == 18
    texts = [c.text for c in first.choices]
    assert [c.text for c in again.choices] == texts
    assert len(set(texts)) > 1
    assert [c.text for c in other.choices] != texts


def test_logprobs_list_each_token_with_its_top_alternatives(client):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 3 <= len(top) <= 4 and lp <= 0
        assert lp == pytest.approx(max(top.values()))  # greedy: the sampled token is the best one
        assert top[token] == pytest.approx(lp)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_prepends_the_prompt_and_its_logprobs(client):
    plain, echoed, (streamed, _, _) = parallel(
        lambda: client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0),
        lambda: client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                          logprobs=1),
        lambda: _stream_texts(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                                        temperature=0, echo=True, stream=True)))
    choice = echoed.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    num_prompt = echoed.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == num_prompt + 4
    assert choice.logprobs.token_logprobs[0] is None  # nothing precedes the first prompt token
    assert all(lp is not None for lp in choice.logprobs.token_logprobs[1:])
    assert streamed[0] == choice.text


def test_stop_string_cuts_the_text_in_both_modes(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[5:8]
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop, "zzzz"])
    cut, (texts, finishes, _) = parallel(lambda: client.completions.create(**kwargs).choices[0],
                                         lambda: _stream_texts(client.completions.create(stream=True, **kwargs)))
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop
    assert texts == {0: cut.text} and finishes == {0: ["stop"]}


def test_sampling_extensions_and_logit_bias_are_applied(client, http):
    greedy = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1, temperature=0)
    [first_id] = http.post("/tokenize", json={"prompt": greedy.choices[0].text,
                                              "add_special_tokens": False}).json()["tokens"]
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, presence_penalty=0.5, frequency_penalty=0.5,
        logit_bias={str(first_id): -100}, user="tester",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6})
    assert not response.choices[0].text.startswith(greedy.choices[0].text)
    assert response.usage.completion_tokens == 6


def test_raw_stream_is_server_sent_events_ending_with_done(http):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
