"""Specification of incremental detokenization, stop strings and stop-string hold-back."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams
from tests.unit.bpe_tokenizer import BpeTokenizer
from tests.unit.bpe_tokenizer import train_byte_level_bpe as train_bpe

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。今天天气很好。我们去公园散步吧。",
    "Emoji party 😀🎉🚀 café naïve résumé — “quotes” ½ ∑",
    "def main():\n    return 42  # answer\n",
]


def train_byte_level_bpe() -> BpeTokenizer:
    """A small byte-level BPE: every byte is a token, so rare characters split across tokens."""
    return train_bpe(CORPUS * 20, 400, SPECIAL_TOKENS)


def train_metaspace_bpe() -> BpeTokenizer:
    """A SentencePiece-style tokenizer: a full decode drops the first token's leading space."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(CORPUS[:1] * 20, trainer)
    return BpeTokenizer(backend, SPECIAL_TOKENS)


TOKENIZER = train_byte_level_bpe()


def ids_of(text: str) -> list[int]:
    return TOKENIZER.backend.encode(text).ids


def special(token: str) -> int:
    return TOKENIZER.backend.token_to_id(token)


def stream(detok: IncrementalDetokenizer, ids: list[int], finish: bool = True) -> tuple[list[str], str | None]:
    """Feed ids one at a time; return the streamed deltas and the stop string hit (if any)."""
    deltas = []
    for i, token_id in enumerate(ids):
        last = finish and i == len(ids) - 1
        stop = detok.update([token_id], stop_terminated=False, finished=last)
        deltas.append(detok.get_next_output_text(finished=last or stop is not None, delta=True))
        if stop is not None:
            return deltas, stop
    return deltas, None


def make(prompt: list[int] | None = None, **params: object) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(TOKENIZER, prompt if prompt is not None else ids_of("Hi"), SamplingParams(**params))


def test_character_split_across_tokens_appears_with_the_token_that_completes_it() -> None:
    ids = ids_of("🚀")
    assert len(ids) > 1, "the test needs an emoji the tokenizer splits"
    detok = make()
    deltas, _ = stream(detok, ids, finish=False)
    assert deltas == [""] * (len(ids) - 1) + ["🚀"]
    assert detok.output_text == "🚀"


def test_cjk_characters_split_across_tokens_decode_exactly() -> None:
    text = "谢谢你，朋友"  # characters absent from the corpus: each one is several byte tokens
    detok = make()
    stream(detok, ids_of(text))
    assert detok.output_text == text


TEXT_ALPHABET = st.sampled_from(list("ab c.\n") + ["é", "你", "好", "谢", "😀", "🎉", "🚀", "½", "Ω"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(TEXT_ALPHABET, min_size=1, max_size=30), cut=st.integers(0, 40), skip=st.booleans())
def test_streamed_pieces_concatenate_to_a_full_decode_of_the_output(text: str, cut: int, skip: bool) -> None:
    ids = ids_of(text)
    cut = min(cut, len(ids) - 1)  # the prompt may end inside a character
    prompt, output = ids[:cut], ids[cut:]
    detok = make(prompt, skip_special_tokens=skip)
    deltas, _ = stream(detok, output)
    assert "".join(deltas) == detok.output_text == TOKENIZER.decode(output, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None)
@given(output=st.lists(st.integers(0, 399), min_size=1, max_size=25), skip=st.booleans())
def test_random_token_sequences_concatenate_to_a_full_decode(output: list[int], skip: bool) -> None:
    detok = make(ids_of("Hello"), skip_special_tokens=skip)
    deltas, _ = stream(detok, output)
    assert "".join(deltas) == TOKENIZER.decode(output, skip_special_tokens=skip)


def test_bytes_of_an_unfinished_character_are_flushed_when_the_request_ends() -> None:
    ids = ids_of("ok😀")[:-1]
    detok = make()
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == TOKENIZER.decode(ids) == detok.output_text
    assert detok.output_text.startswith("ok") and detok.output_text.endswith("\ufffd")


def test_first_token_leading_space_is_decoded_as_in_a_full_decode_of_prompt_and_output() -> None:
    tokenizer = train_metaspace_bpe()
    prompt = tokenizer.backend.encode("Hello world!").ids
    output = tokenizer.backend.encode("Hello quick fox").ids
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    detok.update(output, stop_terminated=False, finished=True)
    full = tokenizer.decode(prompt + output)
    assert detok.output_text == full[len(tokenizer.decode(prompt)) :]
    assert detok.output_text.startswith(" Hello")


def test_special_tokens_are_left_out_when_skip_special_tokens() -> None:
    ids = ids_of("a") + [special("<|im_end|>")] + ids_of("b")
    detok = make(skip_special_tokens=True)
    stream(detok, ids)
    assert detok.output_text == "ab"


def test_special_tokens_are_decoded_when_not_skipped() -> None:
    ids = ids_of("a") + [special("<|im_end|>")] + ids_of("b")
    detok = make(skip_special_tokens=False)
    stream(detok, ids)
    assert detok.output_text == "a<|im_end|>b"


def test_stop_token_that_ended_the_request_is_not_added_to_the_text() -> None:
    detok = make(skip_special_tokens=False)
    detok.update(ids_of("done") + [TOKENIZER.eos_token_id], stop_terminated=True)
    assert detok.output_text == "done"
    assert detok.token_ids[-1] == TOKENIZER.eos_token_id


def test_stop_token_text_is_kept_with_include_stop_str_in_output() -> None:
    detok = make(skip_special_tokens=False, include_stop_str_in_output=True)
    detok.update(ids_of("done") + [TOKENIZER.eos_token_id], stop_terminated=True)
    assert detok.output_text == "done<|endoftext|>"


def test_stop_string_truncates_the_text_before_it() -> None:
    detok = make(stop=["fox"])
    deltas, stop = stream(detok, ids_of("The quick brown fox jumps"))
    assert stop == "fox"
    assert detok.output_text == "The quick brown "
    assert "".join(deltas) == "The quick brown "


def test_stop_string_is_kept_with_include_stop_str_in_output() -> None:
    detok = make(stop=["fox"], include_stop_str_in_output=True)
    deltas, stop = stream(detok, ids_of("The quick brown fox jumps"))
    assert stop == "fox"
    assert detok.output_text == "The quick brown fox"
    assert "".join(deltas) == detok.output_text


def test_text_after_a_stop_string_in_the_same_token_is_dropped() -> None:
    detok = make(stop=["b"], include_stop_str_in_output=True)
    stop = detok.update(ids_of("a") + ids_of("bcd"), stop_terminated=False)
    assert stop == "b"
    assert detok.output_text == "ab"


def test_stop_string_spanning_two_tokens_is_found() -> None:
    first, second = ids_of("Hello wor"), ids_of("ld and more")
    detok = make(stop=["world"])
    assert detok.update(first, stop_terminated=False) is None
    assert detok.update(second, stop_terminated=False) == "world"
    assert detok.output_text == "Hello "


def test_earliest_stop_string_wins_when_several_match() -> None:
    detok = make(stop=["two", "one"])
    assert detok.update(ids_of("zero one two"), stop_terminated=False) == "one"
    assert detok.output_text == "zero "


def test_stop_string_is_not_checked_within_the_first_min_tokens() -> None:
    ids = ids_of("x") * 2 + ids_of("y") + ids_of("x") + ids_of("y")
    detok = make(stop=["xy"], min_tokens=3)
    deltas, stop = stream(detok, ids)
    # "xy" completed by token 3 does not count; the one completed by token 5 does.
    assert stop == "xy"
    assert detok.output_text == "xxy"


def test_stop_string_starting_in_min_tokens_text_and_ending_after_it_counts() -> None:
    ids = ids_of("a") + ids_of("x") + ids_of("y")
    detok = make(stop=["xy"], min_tokens=2)
    _, stop = stream(detok, ids)
    assert stop == "xy"
    assert detok.output_text == "a"


def test_possible_start_of_a_stop_string_is_held_back_while_running() -> None:
    detok = make(stop=["Hello"])
    detok.update(ids_of("Say Hel"), stop_terminated=False)
    assert detok.get_next_output_text(finished=False, delta=False) == "Say "
    detok.update(ids_of("p"), stop_terminated=False)
    assert detok.get_next_output_text(finished=False, delta=False) == "Say Help"


def test_held_back_text_is_released_when_the_request_finishes() -> None:
    detok = make(stop=["Hello"])
    detok.update(ids_of("Say Hel"), stop_terminated=False, finished=True)
    assert detok.get_next_output_text(finished=True, delta=True) == "Say Hel"


def test_nothing_is_held_back_with_include_stop_str_in_output() -> None:
    detok = make(stop=["Hello"], include_stop_str_in_output=True)
    detok.update(ids_of("Say Hel"), stop_terminated=False)
    assert detok.get_next_output_text(finished=False, delta=False) == "Say Hel"


def reference_stop_text(text: str, stops: list[str]) -> str:
    """Text cut at the first stop string to complete while the text grows one char at a time."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s) : end] == s]
        if starts:
            return text[: min(starts)]
    return text


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.sampled_from("abc "), max_size=30),
    stops=st.lists(st.text(st.sampled_from("abc "), min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_streamed_deltas_never_show_a_partial_stop_string_and_concatenate_to_the_final_text(
    text: str, stops: list[str]
) -> None:
    detok = make(stop=stops)
    shown = ""
    for i, char in enumerate(text):
        last = i == len(text) - 1
        stop = detok.update(ids_of(char), stop_terminated=False, finished=last)
        shown += detok.get_next_output_text(finished=last or stop is not None, delta=True)
        # Whatever was shown is never taken back by a later cut.
        assert reference_stop_text(text, stops).startswith(shown)
        if stop is not None:
            break
    assert shown == detok.output_text == reference_stop_text(text, stops)


def test_cumulative_text_never_shrinks_while_streaming() -> None:
    detok = make(stop=["abc"])
    previous = ""
    for char in "ababab":
        detok.update(ids_of(char), stop_terminated=False)
        current = detok.get_next_output_text(finished=False, delta=False)
        assert current.startswith(previous)
        previous = current
    assert previous == "abab"


def test_no_new_tokens_changes_nothing() -> None:
    detok = make(stop=["x"])
    assert detok.update([], stop_terminated=False) is None
    assert detok.output_text == ""


@pytest.mark.parametrize("prompt", [[], ids_of("😀")[:1]])
def test_prompts_that_cannot_prime_the_stream_still_decode_the_output(prompt: list[int]) -> None:
    detok = make(prompt)
    stream(detok, ids_of("fine"))
    assert detok.output_text == "fine"
