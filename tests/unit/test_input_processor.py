"""Prompt token ids are validated as a whole list: every accepted and refused shape, and the ids kept."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm.engine.input_processor import InputProcessor
from pagedllm.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=4)


@pytest.fixture
def processor() -> InputProcessor:
    return InputProcessor(tokenizer=None, max_model_len=64, vocab_size=100)


@pytest.mark.parametrize("ids", [[5], [0, 99, 7], list(np.arange(10)), [np.int32(3), 4, np.uint8(9)]])
def test_integer_lists_are_kept_as_python_ints(processor, ids) -> None:
    for prompt in ({"prompt_token_ids": ids}, ids):
        out = processor.process(prompt, PARAMS).prompt_token_ids
        assert out == [int(t) for t in ids] and all(type(t) is int for t in out)
        assert out is not ids  # a copy: the caller's list may change afterwards


@pytest.mark.parametrize("ids", [[1, 2.5], [1, "2"], [[1, 2], [3]], [[1, 2], [3, 4]], [None], (1, 2)])
def test_anything_but_a_flat_list_of_integers_is_refused(processor, ids) -> None:
    with pytest.raises(ValueError, match="prompt_token_ids must be a list of integers"):
        processor.process({"prompt_token_ids": ids}, PARAMS)


@pytest.mark.parametrize("ids, bad", [([1, 100], 100), ([-1, 3], -1), ([3, 10**30, -5], 10**30), ([2, 10**6], 10**6)])
def test_the_first_id_outside_the_vocabulary_is_named(processor, ids, bad) -> None:
    with pytest.raises(ValueError, match=rf"Token id {bad} in the prompt is outside the vocabulary \[0, 100\)"):
        processor.process({"prompt_token_ids": ids}, PARAMS)
