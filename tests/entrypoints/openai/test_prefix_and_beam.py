"""Prefix caching and beam search through the server: cached_tokens, cache_salt, metrics, use_beam_search."""

from __future__ import annotations

import uuid

from tests.conftest import requires_embedded_model
from tests.entrypoints.openai.conftest import MODEL_NAME, parallel
from tests.entrypoints.openai.test_concurrency import metric_values

pytestmark = requires_embedded_model

BEAM_PROMPT = "The best way to learn a language is"


def _unique_long_prompt() -> str:
    """A prompt of well over ten KV blocks that no earlier request shares (the nonce comes first)."""
    return f"[{uuid.uuid4().hex}] " + "Paged attention stores the KV cache in fixed-size blocks. " * 12


def _cached(client, prompt: str, cache_salt: str | None = None) -> int:
    extra_body = {"cache_salt": cache_salt} if cache_salt is not None else None
    response = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0,
                                         extra_body=extra_body)
    return response.usage.prompt_tokens_details.cached_tokens


def test_a_repeated_long_prompt_reports_cached_tokens_and_its_first_request_none(client):
    prompt = _unique_long_prompt()
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    num_prompt = second.usage.prompt_tokens
    # Whole blocks of 16 are reused; at least the last prompt token is computed again.
    assert num_prompt - 16 <= second.usage.prompt_tokens_details.cached_tokens < num_prompt
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in streamed if chunk.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens_details.cached_tokens


def test_a_repeated_chat_system_prompt_reports_cached_tokens(client):
    messages = [{"role": "system", "content": _unique_long_prompt()}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1, stream=True,
                                            stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 16


def test_requests_with_different_cache_salts_share_no_blocks(client):
    prompt = _unique_long_prompt()
    assert _cached(client, prompt, cache_salt="alice") == 0
    assert _cached(client, prompt, cache_salt="bob") == 0
    assert _cached(client, prompt) == 0  # unsalted requests do not see salted blocks either
    assert _cached(client, prompt, cache_salt="alice") > 0


def test_prefix_cache_metrics_count_queried_and_hit_prompt_tokens(client, http):
    prompt = _unique_long_prompt()
    before = metric_values(http)
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    second = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    after = metric_values(http)

    def delta(name: str) -> float:
        return after[(f"pagedllm:{name}_total", ())] - before.get((f"pagedllm:{name}_total", ()), 0.0)

    assert delta("prefix_cache_queries") == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert delta("prefix_cache_hits") == second.usage.prompt_tokens_details.cached_tokens > 0


def test_beam_search_completions_equal_offline_llm_beam_search(client, offline_llm):
    from pagedllm import BeamSearchParams

    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5)
    [expected] = offline_llm.beam_search([BEAM_PROMPT], params)
    kwargs = dict(model=MODEL_NAME, prompt=BEAM_PROMPT, max_tokens=6, n=2,
                  extra_body={"use_beam_search": True, "best_of": 3, "length_penalty": 0.5})
    response, streamed = parallel(lambda: client.completions.create(**kwargs),
                                  lambda: list(client.completions.create(stream=True, **kwargs)))
    best = expected.sequences[:2]
    assert [(c.index, c.text, c.finish_reason) for c in response.choices] == \
        [(i, s.text, s.finish_reason) for i, s in enumerate(best)]
    assert response.usage.completion_tokens == sum(len(s.output_token_ids) for s in best)
    assert {c.index: c.text for chunk in streamed for c in chunk.choices} == {c.index: c.text for c in response.choices}


def test_beam_search_chat_equals_offline_llm_beam_search_of_the_rendered_prompt(client, offline_llm):
    from pagedllm import BeamSearchParams

    messages = [{"role": "user", "content": "Name a colour."}]
    tokenizer = offline_llm.get_tokenizer()
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special_tokens=False)
    [expected] = offline_llm.beam_search([prompt_ids], BeamSearchParams(beam_width=2, max_tokens=5))
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, n=2,
                                              extra_body={"use_beam_search": True})
    assert [c.message.content for c in response.choices] == [s.text for s in expected.sequences]
    assert response.usage.prompt_tokens == len(prompt_ids)
