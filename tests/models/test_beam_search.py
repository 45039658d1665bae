"""Beam search equals Hugging Face's `generate(num_beams=...)` on a tiny model, token for token."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from pagedllm import LLM, BeamSearchParams
from tests.models.tiny_models import VOCAB_SIZE, build_tiny_model

MAX_TOKENS = 12


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (5, 17, 30)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    path = str(tmp_path_factory.mktemp("llama"))
    return path, build_tiny_model("LlamaForCausalLM", path)


def hf_beam_search(model: torch.nn.Module, prompt: list[int], beam_width: int, length_penalty: float,
                   early_stopping: bool | str, eos_token_id: int) -> tuple[list[list[int]], list[float]]:
    """HF's sequences (padded with EOS to one length) and their length-penalized scores."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             num_beams=beam_width, num_return_sequences=beam_width, max_new_tokens=MAX_TOKENS,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             eos_token_id=eos_token_id, pad_token_id=0, return_dict_in_generate=True,
                             output_scores=True)
    return out.sequences.tolist(), out.sequences_scores.tolist()


def assert_equal_to_hf(llm: LLM, model: torch.nn.Module, params: BeamSearchParams, eos_token_id: int) -> int:
    """Compare every prompt's beams with HF's; returns how many sequences ended with EOS."""
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in _prompts()], params)
    num_stopped = 0
    for prompt, output in zip(_prompts(), outputs):
        expected, expected_scores = hf_beam_search(model, prompt, params.beam_width, params.length_penalty,
                                                   params.early_stopping, eos_token_id)
        length = len(expected[0])
        assert [s.tokens + [eos_token_id] * (length - len(s.tokens)) for s in output.sequences] == expected
        assert [s.score for s in output.sequences] == pytest.approx(expected_scores, abs=1e-4)
        for sequence in output.sequences:
            assert sequence.cum_logprob == pytest.approx(
                sum(lp[t].logprob for t, lp in zip(sequence.output_token_ids, sequence.logprobs)))
            num_stopped += sequence.finish_reason == "stop"
    return num_stopped


@pytest.mark.parametrize("beam_width, length_penalty, early_stopping",
                         [(4, 1.0, False), (3, 0.5, True), (4, 2.0, "never")])
def test_beam_search_equals_hf(tiny, beam_width, length_penalty, early_stopping):
    path, model = tiny
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=48)
    params = BeamSearchParams(beam_width=beam_width, max_tokens=MAX_TOKENS, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    assert_equal_to_hf(llm, model, params, eos_token_id=2)
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    # Beams share their parents' blocks: nearly every token comes from the prefix cache.
    assert stats.prefix_cache_hits > 0.8 * stats.prefix_cache_queries
    assert llm.llm_engine.engine_core.kv_cache_manager.num_free_blocks == 48


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_with_finished_beams_equals_hf(tiny, tmp_path, early_stopping):
    path, model = tiny
    # Make a token the model often picks the end-of-sequence token, so beams finish early.
    frequent = hf_beam_search(model, _prompts()[0], 2, 1.0, False, eos_token_id=2)[0][0][len(_prompts()[0]) + 2]
    eos_path = tmp_path / "eos"
    shutil.copytree(path, eos_path)
    config = json.loads((eos_path / "config.json").read_text())
    (eos_path / "config.json").write_text(json.dumps({**config, "eos_token_id": frequent}))
    llm = LLM(str(eos_path), skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=48)
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS, length_penalty=1.0, early_stopping=early_stopping)
    assert assert_equal_to_hf(llm, model, params, eos_token_id=frequent) > 0


def test_beam_search_outputs_are_shaped_like_vllms(tiny):
    path, _ = tiny
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=48)
    (output,) = llm.beam_search([{"prompt_token_ids": _prompts()[0]}], BeamSearchParams(beam_width=2, max_tokens=5))
    assert len(output.sequences) == 2
    best = output.sequences[0]
    assert best.tokens[:5] == _prompts()[0] and len(best.output_token_ids) == 5
    assert best.finish_reason == "length" and best.text is None  # no tokenizer: no text
    assert output.sequences[0].score >= output.sequences[1].score


@pytest.mark.parametrize("field, value", [("beam_width", 0), ("max_tokens", 0), ("early_stopping", "sometimes")])
def test_invalid_beam_search_parameters_name_the_field(field, value):
    arguments = {"beam_width": 2, "max_tokens": 4, field: value}
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**arguments)


def test_beam_search_without_prefix_caching_gives_the_same_beams(tiny):
    path, model = tiny
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=48,
              enable_prefix_caching=False)
    assert_equal_to_hf(llm, model, BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS), eos_token_id=2)
