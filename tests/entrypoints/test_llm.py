"""The offline API on the embedded model: prompt shapes, sampling behaviour, and bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_embedded_model

from pagedllm import LLM, SamplingParams

pytestmark = requires_embedded_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512, max_num_seqs=16)


def _assert_pool_free(llm: LLM) -> None:
    engine = llm.llm_engine
    assert engine.engine_core.kv_cache_manager.num_free_blocks == engine.config.cache_config.num_blocks


def test_outputs_come_back_in_prompt_order_for_every_prompt_shape(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("Hello there")
    prompts = ["The capital of France is", {"prompt": "Hello there"}, {"prompt_token_ids": ids}, "1, 2, 3,"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == ["The capital of France is", "Hello there", None, "1, 2, 3,"]
    assert outputs[1].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    alone = llm.generate("1, 2, 3,", GREEDY, use_tqdm=False)[0]
    assert outputs[3].outputs[0].token_ids == alone.outputs[0].token_ids
    _assert_pool_free(llm)


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Tell me a story", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["Hi", "Tell me a story", "A long time ago", "Zebras"], [others, seeded, others, others],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_n_samples_are_returned_as_one_request_output(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate("Colors:", params, use_tqdm=False)
    second = llm.generate("Colors:", params, use_tqdm=False)
    assert len(first) == 1 and [c.index for c in first[0].outputs] == [0, 1, 2]
    assert [c.token_ids for c in first[0].outputs] == [c.token_ids for c in second[0].outputs]
    assert len({tuple(c.token_ids) for c in first[0].outputs}) > 1


def test_stop_string_cuts_the_text_and_is_reported(llm):
    full = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[6:9]
    cut = llm.generate("The capital of France is", GREEDY.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate("The capital of France is", GREEDY.clone(stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_min_tokens_keeps_stop_tokens_from_ending_early(llm):
    first_token = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0].outputs[0].token_ids[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[first_token], min_tokens=4)
    out = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4
    assert first_token not in out.token_ids[:4]


def test_max_tokens_ends_with_length(llm):
    out = llm.generate("Count: 1, 2,", SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (5, "length")


def test_logprobs_include_the_sampled_token_and_top_n(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate("The capital of France is", params, use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert token in position and position[token].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
    assert completion.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in
                                                               zip(completion.token_ids, completion.logprobs)))
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in position


@pytest.mark.parametrize(
    "prompt, message",
    [("", "empty"), ({"prompt_token_ids": []}, "empty"), ({"prompt_token_ids": [1] * 600}, "max_model_len"),
     ({"prompt_token_ids": [10**6]}, "outside the vocabulary"), (3.5, "Unsupported prompt type")],
)
def test_bad_prompts_fail_with_a_clear_error_and_do_not_disturb_running_requests(llm, prompt, message):
    engine = llm.llm_engine
    expected = llm.generate(["Water is", "Fire is"], GREEDY, use_tqdm=False)
    engine.add_request("good-0", "Water is", GREEDY)
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, GREEDY)
    engine.add_request("good-1", "Fire is", GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert finished == {"good-0": expected[0].outputs[0].token_ids, "good-1": expected[1].outputs[0].token_ids}
    _assert_pool_free(llm)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -5), ("min_p", 1.5), ("n", 0), ("max_tokens", 0),
     ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("logprobs", -1), ("min_tokens", 100)],
)
def test_invalid_sampling_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value, "max_tokens": 16} if field != "max_tokens" else {field: value})


def test_missing_model_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(missing)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "vocab_size": 10,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1}))
    with pytest.raises(ValueError, match="FooForCausalLM.*LlamaForCausalLM"):
        LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
