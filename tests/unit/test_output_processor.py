"""Specification of the output processor: output kinds, stop strings, logprobs, n > 1 fan-out."""

from __future__ import annotations

import pytest

from pagedllm.core.scheduler_output import EngineCoreOutput
from pagedllm.engine.output_processor import OutputProcessor, ParentRequest
from pagedllm.outputs import Logprob, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.worker.runner_output import LogprobsLists
from tests.unit.bpe_tokenizer import train_byte_level_bpe

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>"]


TOKENIZER = train_byte_level_bpe(["Hello world, the quick brown fox. 你好 😀"] * 20, 300, SPECIAL_TOKENS)
PROMPT_IDS = TOKENIZER.backend.encode("Hello world").ids


def ids_of(text: str) -> list[int]:
    return TOKENIZER.backend.encode(text).ids


def out(req_id: str, tokens: list[int], finish: str | None = None, **fields: object) -> EngineCoreOutput:
    return EngineCoreOutput(req_id=req_id, new_token_ids=tokens, finish_reason=finish, **fields)


def processor_with(request_id: str = "r", **params: object) -> OutputProcessor:
    processor = OutputProcessor(TOKENIZER)
    processor.add_request(request_id, "Hello world", PROMPT_IDS, SamplingParams(**params), arrival_time=0.0)
    return processor


def step(processor: OutputProcessor, *outputs: EngineCoreOutput, now: float = 1.0) -> list[RequestOutput]:
    return processor.process_outputs(list(outputs), now=now).request_outputs


def test_cumulative_outputs_carry_all_text_and_ids_so_far() -> None:
    processor = processor_with()
    a, b = ids_of("Hello"), ids_of(" fox")
    step(processor, out("r", a))
    (second,) = step(processor, out("r", b, "length"))
    assert second.outputs[0].text == "Hello fox"
    assert second.outputs[0].token_ids == a + b
    assert second.finished and second.outputs[0].finish_reason == "length"


def test_delta_outputs_carry_only_the_new_text_and_ids() -> None:
    processor = processor_with(output_kind=RequestOutputKind.DELTA)
    a, b = ids_of("Hello"), ids_of(" fox")
    (first,) = step(processor, out("r", a))
    (second,) = step(processor, out("r", b, "length"))
    assert (first.outputs[0].text, first.outputs[0].token_ids) == ("Hello", a)
    assert (second.outputs[0].text, second.outputs[0].token_ids) == (" fox", b)


def test_final_only_emits_one_output_when_the_request_finishes() -> None:
    processor = processor_with(output_kind=RequestOutputKind.FINAL_ONLY)
    assert step(processor, out("r", ids_of("Hello"))) == []
    (final,) = step(processor, out("r", ids_of(" fox"), "length"))
    assert final.finished and final.outputs[0].text == "Hello fox"


def test_earlier_cumulative_outputs_are_not_changed_by_later_steps() -> None:
    processor = processor_with()
    (first,) = step(processor, out("r", ids_of("Hello")))
    step(processor, out("r", ids_of(" fox")))
    assert first.outputs[0].text == "Hello"
    assert first.outputs[0].token_ids == ids_of("Hello")


def test_stop_string_finishes_the_request_and_asks_the_core_to_abort_it() -> None:
    processor = processor_with(stop=["fox"])
    result = processor.process_outputs([out("r", ids_of("the quick fox jumps"))], now=1.0)
    assert result.reqs_to_abort == ["r"]
    (final,) = result.request_outputs
    assert final.finished
    assert final.outputs[0].text == "the quick "
    assert (final.outputs[0].finish_reason, final.outputs[0].stop_reason) == ("stop", "fox")
    assert not processor.has_unfinished_requests()


def test_stop_string_in_the_core_s_last_step_needs_no_abort() -> None:
    processor = processor_with(stop=["fox"])
    result = processor.process_outputs([out("r", ids_of("a fox"), "length")], now=1.0)
    assert result.reqs_to_abort == []
    assert result.request_outputs[0].outputs[0].stop_reason == "fox"


def test_streamed_delta_text_never_shows_a_stop_string_prefix_that_is_later_cut() -> None:
    processor = processor_with(stop=["fox"], output_kind=RequestOutputKind.DELTA)
    texts = [o.outputs[0].text for c in "a fo" for o in step(processor, out("r", ids_of(c)))]
    texts += [o.outputs[0].text for o in step(processor, out("r", ids_of("x")))]
    assert texts == ["a", " ", "", "", ""]


def test_eos_token_is_in_the_token_ids_but_not_in_the_text() -> None:
    processor = processor_with(skip_special_tokens=False)
    eos = TOKENIZER.eos_token_id
    (final,) = step(processor, out("r", ids_of("done") + [eos], "stop"))
    assert final.outputs[0].token_ids[-1] == eos
    assert final.outputs[0].text == "done"


def test_special_tokens_are_skipped_in_the_text() -> None:
    processor = processor_with()
    im_end = TOKENIZER.backend.token_to_id("<|im_end|>")
    (output,) = step(processor, out("r", ids_of("a") + [im_end] + ids_of("b")))
    assert output.outputs[0].text == "ab"


def test_no_tokenizer_gives_token_ids_and_empty_text() -> None:
    processor = OutputProcessor(None)
    processor.add_request("r", None, PROMPT_IDS, SamplingParams(logprobs=2), arrival_time=0.0)
    rows = LogprobsLists([[7, 7, 8]], [[-0.1, -0.1, -2.0]], [1])
    (output,) = step(processor, out("r", [7], new_logprobs=rows))
    assert (output.outputs[0].text, output.outputs[0].token_ids) == ("", [7])
    assert output.outputs[0].logprobs == [{7: Logprob(-0.1, 1, None), 8: Logprob(-2.0, 2, None)}]


def test_sample_logprobs_hold_the_sampled_token_and_the_top_k_ranked_with_text() -> None:
    processor = processor_with(logprobs=2)
    h, w = ids_of("H")[0], ids_of("w")[0]
    # Row: [sampled, top-1, top-2, top-3]; the runner may send more than this request's k.
    rows = LogprobsLists([[h, w, h, 5]], [[-1.5, -0.5, -1.5, -3.0]], [2])
    (output,) = step(processor, out("r", [h], new_logprobs=rows))
    (position,) = output.outputs[0].logprobs
    assert list(position) == [h, w]
    assert position[h] == Logprob(-1.5, 2, "H")
    assert position[w] == Logprob(-0.5, 1, "w")


def test_sampled_token_outside_the_top_k_keeps_its_own_rank() -> None:
    processor = processor_with(logprobs=1)
    rows = LogprobsLists([[9, 4]], [[-7.0, -0.2]], [57])
    (output,) = step(processor, out("r", [9], new_logprobs=rows))
    (position,) = output.outputs[0].logprobs
    assert {t: lp.rank for t, lp in position.items()} == {9: 57, 4: 1}


def test_cumulative_logprob_is_the_sum_of_sampled_token_logprobs() -> None:
    processor = processor_with(logprobs=0)
    step(processor, out("r", [5], new_logprobs=LogprobsLists([[5]], [[-0.5]], [1])))
    (output,) = step(processor, out("r", [6], new_logprobs=LogprobsLists([[6]], [[-0.25]], [3])))
    assert output.outputs[0].cumulative_logprob == pytest.approx(-0.75)
    assert len(output.outputs[0].logprobs) == 2


def test_cumulative_logprob_is_none_without_logprobs() -> None:
    processor = processor_with()
    (output,) = step(processor, out("r", [5]))
    assert output.outputs[0].cumulative_logprob is None and output.outputs[0].logprobs is None


def test_delta_logprobs_cover_only_the_new_tokens() -> None:
    processor = processor_with(logprobs=0, output_kind=RequestOutputKind.DELTA)
    step(processor, out("r", [5], new_logprobs=LogprobsLists([[5]], [[-0.5]], [1])))
    (output,) = step(processor, out("r", [6], new_logprobs=LogprobsLists([[6]], [[-0.25]], [3])))
    assert output.outputs[0].logprobs == [{6: Logprob(-0.25, 3, TOKENIZER.id_to_text(6))}]


def test_prompt_logprobs_accumulate_across_two_prefill_chunks() -> None:
    prompt = [10, 11, 12, 13]
    processor = OutputProcessor(TOKENIZER)
    processor.add_request("r", None, prompt, SamplingParams(prompt_logprobs=1), arrival_time=0.0)
    chunk1 = LogprobsLists([[11, 20], [12, 12]], [[-1.0, -0.1], [-0.3, -0.3]], [4, 1])
    chunk2 = LogprobsLists([[13, 30]], [[-2.0, -0.7]], [9])
    assert step(processor, out("r", [], new_prompt_logprobs=chunk1)) == []  # prefill not done
    (output,) = step(processor, out("r", [40], new_prompt_logprobs=chunk2))
    logprobs = output.prompt_logprobs
    assert len(logprobs) == len(prompt) and logprobs[0] is None
    text = TOKENIZER.id_to_text
    assert logprobs[1] == {11: Logprob(-1.0, 4, text(11)), 20: Logprob(-0.1, 1, text(20))}
    assert list(logprobs[2]) == [12] and logprobs[2][12].rank == 1
    assert {t: lp.rank for t, lp in logprobs[3].items()} == {13: 9, 30: 1}


def test_delta_outputs_send_prompt_logprobs_once() -> None:
    processor = processor_with(prompt_logprobs=0, output_kind=RequestOutputKind.DELTA)
    positions = len(PROMPT_IDS) - 1
    rows = LogprobsLists([[t] for t in PROMPT_IDS[1:]], [[-1.0]] * positions, [1] * positions)
    (first,) = step(processor, out("r", [5], new_prompt_logprobs=rows))
    (second,) = step(processor, out("r", [6]))
    assert len(first.prompt_logprobs) == len(PROMPT_IDS) and second.prompt_logprobs is None


def test_metrics_record_arrival_first_token_last_token_and_finish_times() -> None:
    processor = processor_with()
    step(processor, out("r", [5]), now=2.0)
    (final,) = step(processor, out("r", [6, 7], "length"), now=3.5)
    metrics = final.metrics
    assert (metrics.arrival_time, metrics.first_token_time) == (0.0, 2.0)
    assert (metrics.last_token_time, metrics.finished_time) == (3.5, 3.5)
    assert metrics.token_times == [2.0, 3.5, 3.5]


def test_num_cached_tokens_comes_from_the_core() -> None:
    processor = processor_with()
    (output,) = step(processor, out("r", [5], num_cached_tokens=16))
    assert output.num_cached_tokens == 16


def test_abort_drops_the_request_state() -> None:
    processor = processor_with()
    assert processor.abort_requests(["r", "unknown"]) == ["r"]
    assert not processor.has_unfinished_requests()
    assert step(processor, out("r", [5])) == []  # a late core output for it is ignored


def test_duplicate_request_id_is_rejected() -> None:
    processor = processor_with()
    with pytest.raises(ValueError, match="already running"):
        processor.add_request("r", None, [1], SamplingParams(), arrival_time=0.0)


def add_parent(processor: OutputProcessor, **params: object) -> ParentRequest:
    parent = ParentRequest("p", SamplingParams(n=3, **params))
    for child_id, child_params, index in parent.child_requests():
        processor.add_request(child_id, "Hello world", PROMPT_IDS, child_params, 0.0, parent=parent, index=index)
    return parent


def test_parent_request_fans_out_into_n_single_sample_children_with_distinct_seeds() -> None:
    parent = ParentRequest("p", SamplingParams(n=3, seed=7, temperature=0.8))
    children = parent.child_requests()
    assert [(cid, i) for cid, _, i in children] == [("0_p", 0), ("1_p", 1), ("2_p", 2)]
    assert [(p.n, p.seed, p.temperature) for _, p, _ in children] == [(1, 7, 0.8), (1, 8, 0.8), (1, 9, 0.8)]
    assert all(p.seed is None for _, p, _ in ParentRequest("q", SamplingParams(n=2)).child_requests())


def test_n3_children_aggregate_into_one_output_finished_only_at_the_last_child() -> None:
    processor = OutputProcessor(TOKENIZER)
    add_parent(processor)
    (first,) = step(processor, out("0_p", ids_of("a")), out("1_p", ids_of("b"), "length"))
    assert first.request_id == "p" and not first.finished
    expected = [(0, "a", None), (1, "b", "length"), (2, "", None)]
    assert [(c.index, c.text, c.finish_reason) for c in first.outputs] == expected
    (second,) = step(processor, out("2_p", ids_of("c"), "length"))
    assert not second.finished and [c.text for c in second.outputs] == ["a", "b", "c"]
    (final,) = step(processor, out("0_p", ids_of("x"), "length"))
    assert final.finished and [c.text for c in final.outputs] == ["ax", "b", "c"]
    assert not processor.has_unfinished_requests()


def test_n3_final_only_emits_once_with_all_children() -> None:
    processor = OutputProcessor(TOKENIZER)
    add_parent(processor, output_kind=RequestOutputKind.FINAL_ONLY)
    assert step(processor, out("0_p", ids_of("a"), "length"), out("1_p", ids_of("b"))) == []
    assert step(processor, out("1_p", ids_of("c"), "length")) == []
    (final,) = step(processor, out("2_p", ids_of("d"), "length"))
    assert final.finished
    assert [(c.index, c.text) for c in final.outputs] == [(0, "a"), (1, "bc"), (2, "d")]


def test_n3_delta_outputs_carry_only_the_children_that_changed() -> None:
    processor = OutputProcessor(TOKENIZER)
    add_parent(processor, output_kind=RequestOutputKind.DELTA)
    step(processor, out("0_p", ids_of("a")), out("2_p", ids_of("b")))
    (output,) = step(processor, out("2_p", ids_of("c")))
    assert [(c.index, c.text) for c in output.outputs] == [(2, "c")]


def test_n3_stop_string_in_one_child_aborts_only_that_child() -> None:
    processor = OutputProcessor(TOKENIZER)
    add_parent(processor, stop=["fox"])
    result = processor.process_outputs([out("1_p", ids_of("a fox")), out("0_p", ids_of("b"))], now=1.0)
    assert result.reqs_to_abort == ["1_p"]
    (output,) = result.request_outputs
    assert not output.finished and output.outputs[1].text == "a " and output.outputs[1].stop_reason == "fox"


def test_aborting_a_parent_aborts_its_unfinished_children() -> None:
    processor = OutputProcessor(TOKENIZER)
    add_parent(processor)
    step(processor, out("1_p", [5], "length"))
    assert processor.abort_requests(["p"]) == ["0_p", "2_p"]
    assert not processor.has_unfinished_requests()
