"""POST /v1/chat/completions through the official client: template, streaming, n > 1, logprobs, limits, stop."""

from __future__ import annotations

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import MODEL_NAME, parallel

pytestmark = requires_embedded_model

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def _collect(stream) -> tuple[dict[int, str], dict[int, list[str]], list, object]:
    """Per choice: the concatenated content and every finish_reason; all chunks; the usage chunk's usage."""
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    chunks = list(stream)
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, finishes, chunks, usage


def test_chat_answers_with_the_template_and_counts_the_rendered_prompt(client, http):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    assert response.object == "chat.completion"
    [choice] = response.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    count = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert response.usage.prompt_tokens == count
    assert response.usage.total_tokens == count + response.usage.completion_tokens


def test_greedy_chat_equals_offline_llm_chat(client, offline_llm):
    from pagedllm import SamplingParams

    offline = offline_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    assert response.choices[0].message.content == offline.outputs[0].text
    assert response.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_stream_starts_with_the_role_and_concatenates_to_the_full_answer(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, n=2, temperature=0.9, seed=3)
    full, (texts, finishes, chunks, usage) = parallel(
        lambda: client.chat.completions.create(**kwargs),
        lambda: _collect(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **kwargs)))
    first_deltas = {}
    for chunk in chunks:
        for choice in chunk.choices:
            first_deltas.setdefault(choice.index, choice.delta)
    assert {i: d.role for i, d in first_deltas.items()} == {0: "assistant", 1: "assistant"}
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finishes == {c.index: [c.finish_reason] for c in full.choices}
    assert chunks[-1].choices == [] and usage.model_dump() == full.usage.model_dump()
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)


def test_logprobs_give_each_token_and_its_top_alternatives(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the best token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode() == entry.token


def test_text_parts_limits_and_stop(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    by_parts, by_string, limited, legacy = parallel(
        lambda: client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=6, temperature=0),
        lambda: client.chat.completions.create(model=MODEL_NAME, messages=joined, max_tokens=6, temperature=0),
        lambda: client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                               max_completion_tokens=3, extra_body={"ignore_eos": True}),
        lambda: client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=4,
                                               extra_body={"ignore_eos": True}))
    assert by_parts.choices[0].message.content == by_string.choices[0].message.content
    assert limited.usage.completion_tokens == 3 and limited.choices[0].finish_reason == "length"
    assert legacy.usage.completion_tokens == 4
    full = legacy.choices[0].message.content
    stop = full[3:6]
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=4,
                                             stop=stop)
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
