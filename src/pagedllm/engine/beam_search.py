"""Beam search as a sequence of one-token generation steps over the prefix cache.

Each step asks the engine for the top-k next tokens of every live beam (one request per beam,
`max_tokens=1`, `logprobs=k`), then keeps the best continuations. Beams share blocks through
the prefix cache: a beam's request hits its parent's full blocks (shared by reference count)
and its parent's partial last block (copied on write), so every step computes one new token
per beam rather than the beam's whole sequence.

`BeamSearchInstance` is the search for one prompt, independent of how the steps are run: a
driver sends `step_requests()` to an engine, feeds their finished outputs to
`update_from_outputs()`, and repeats until `done`. The offline `LLM.beam_search` batches the
beams of every prompt into one generate call per step; the server's `AsyncLLM.beam_search`
queues each step's requests together so they share an engine step.
It reproduces Hugging Face transformers' beam search (`generate(num_beams=beam_width,
do_sample=False, length_penalty=..., early_stopping=...)`, the vectorized implementation of
transformers >= 4.50) token for token, given the same log-probabilities:

- Candidates: the top K = max(2, 1 + number of EOS ids) * beam_width continuations over all
  beams by cumulative log-probability (the first step expands the prompt alone).
- A candidate ending in EOS, or reaching the maximum length, "hits a stop". The best
  beam_width candidates that do not continue as beams; among the first beam_width candidates,
  those that hit a stop become finished hypotheses scored cum_logprob / generated_len **
  length_penalty, and the best beam_width hypotheses are kept.
- The search ends when no candidate can continue, when early_stopping is True and beam_width
  hypotheses are finished, or when the best running beam can no longer beat the worst kept
  hypothesis by HF's estimate (its score over the current generated length, or over the
  maximum length with early_stopping="never" and a positive length penalty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.input_processor import PromptType
from pagedllm.outputs import BeamSearchSequence, CompletionOutput, Logprob, RequestOutput, SampleLogprobs
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from pagedllm.tokenizer import Tokenizer


@dataclass
class _Beam:
    """A live beam: all its tokens (prompt included) and the log-probability of its generated part."""

    tokens: list[int]
    cum_logprob: float
    logprobs: SampleLogprobs = field(default_factory=list)


@dataclass
class _Candidate:
    """A continuation of a beam by one token, in the order HF ranks them."""

    cum_logprob: float
    beam: _Beam
    token_id: int
    logprobs: dict[int, Logprob]


class BeamSearchInstance:
    """The beam search of one prompt: live beams, finished hypotheses and HF's stopping rule."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: BeamSearchParams,
        eos_token_ids: set[int],
        max_model_len: int,
        cache_salt: str | None = None,
    ) -> None:
        self.params = params
        self.cache_salt = cache_salt
        self.num_prompt_tokens = len(prompt_token_ids)
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        # Keep enough candidates that beam_width of them survive even if the best ones all end in EOS.
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * params.beam_width
        self.max_length = min(self.num_prompt_tokens + params.max_tokens, max_model_len)
        if self.max_length <= self.num_prompt_tokens:
            raise ValueError(
                f"The prompt has {self.num_prompt_tokens} tokens: no room to generate within "
                f"max_model_len={max_model_len}.")
        self.beams = [_Beam(list(prompt_token_ids), 0.0)]
        self.finished: list[BeamSearchSequence] = []  # best first, at most beam_width
        self.cur_len = self.num_prompt_tokens
        self.improvement_possible = True
        self.done = False

    def step_params(self) -> SamplingParams:
        """The SamplingParams of each beam's request for one step: one token, the top-K logprobs."""
        return SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.num_candidates, ignore_eos=True,
                              detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)

    def step_requests(self) -> list[tuple[PromptType, SamplingParams]]:
        """The (prompt, params) of this step's engine requests: one per live beam, in `beams` order."""
        requests: list[tuple[PromptType, SamplingParams]] = []
        for beam in self.beams:
            prompt: dict[str, Any] = {"prompt_token_ids": beam.tokens}
            if self.cache_salt is not None:
                prompt["cache_salt"] = self.cache_salt  # beams share blocks only within their salt
            requests.append((prompt, self.step_params()))
        return requests

    def update_from_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        """Advance one step from the finished outputs of `step_requests()`, in the same order."""
        self.update([output.outputs[0].logprobs[0] for output in outputs])

    def update(self, next_token_logprobs: list[dict[int, Logprob]]) -> None:
        """Advance one step, given the next-token logprobs (top K at least) of each beam in `beams`."""
        if self.done:
            raise ValueError("This beam search has already finished.")
        if len(next_token_logprobs) != len(self.beams):
            raise ValueError(f"Got next-token logprobs for {len(next_token_logprobs)} beams, "
                             f"expected {len(self.beams)}.")
        width = self.params.beam_width
        candidates = [
            _Candidate(beam.cum_logprob + logprob.logprob, beam, token_id, logprobs)
            for beam, logprobs in zip(self.beams, next_token_logprobs)
            for token_id, logprob in sorted(logprobs.items(), key=lambda item: -item[1].logprob)[: self.num_candidates]
        ]
        # Stable sort: ties keep beam order, then token order, like a top-k over beams x vocabulary.
        candidates.sort(key=lambda c: -c.cum_logprob)
        candidates = candidates[: self.num_candidates]
        new_len = self.cur_len + 1
        hits_stop = [c.token_id in self.eos_token_ids or new_len >= self.max_length for c in candidates]

        self._add_finished(candidates[:width], hits_stop[:width], new_len)
        self.beams = [self._extend(c) for c, hit in zip(candidates, hits_stop) if not hit][:width]
        self.cur_len = new_len
        self._check_done(all(hits_stop))

    def _add_finished(self, top_candidates: list[_Candidate], hits_stop: list[bool], new_len: int) -> None:
        """Top-ranked candidates that stop become hypotheses, unless adding can no longer help."""
        full = len(self.finished) == self.params.beam_width
        if not self.improvement_possible or (full and self.params.early_stopping is True):
            return
        generated_len = new_len - self.num_prompt_tokens
        for candidate, hit in zip(top_candidates, hits_stop):
            if not hit:
                continue
            beam = self._extend(candidate)
            self.finished.append(BeamSearchSequence(
                tokens=beam.tokens,
                logprobs=beam.logprobs,
                cum_logprob=beam.cum_logprob,
                score=beam.cum_logprob / generated_len**self.params.length_penalty,
                finish_reason="stop" if candidate.token_id in self.eos_token_ids else "length",
                num_prompt_tokens=self.num_prompt_tokens,
            ))
        # Stable: among equal scores the earlier hypothesis stays ahead, as in HF's merge.
        self.finished.sort(key=lambda s: -s.score)
        del self.finished[self.params.beam_width :]

    def _check_done(self, no_valid_continuation: bool) -> None:
        """HF's stopping rule, evaluated after the step (cur_len already advanced)."""
        params = self.params
        full = len(self.finished) == params.beam_width
        if full and self.beams:
            if params.early_stopping == "never" and params.length_penalty > 0.0:
                best_len = self.max_length - self.num_prompt_tokens
            else:
                best_len = self.cur_len - self.num_prompt_tokens
            best_possible = self.beams[0].cum_logprob / best_len**params.length_penalty
            worst_finished = self.finished[-1].score
            self.improvement_possible = self.improvement_possible and best_possible > worst_finished
        self.done = (not self.improvement_possible or (full and params.early_stopping is True)
                     or no_valid_continuation or not self.beams)

    @staticmethod
    def _extend(candidate: _Candidate) -> _Beam:
        beam = candidate.beam
        return _Beam(beam.tokens + [candidate.token_id], candidate.cum_logprob,
                     beam.logprobs + [candidate.logprobs])

    def results(self, tokenizer: Tokenizer | None = None) -> list[BeamSearchSequence]:
        """The finished sequences, best first (at most beam_width); with a tokenizer, their text too."""
        sequences = list(self.finished)
        if tokenizer is not None:
            for sequence in sequences:
                generated = sequence.output_token_ids
                if sequence.finish_reason == "stop":
                    generated = generated[:-1]  # the EOS token has no text
                sequence.text = tokenizer.decode(generated)
        return sequences


def beam_search_request_output(request_id: str, prompt: str | None, prompt_token_ids: list[int],
                               sequences: list[BeamSearchSequence], num_cached_tokens: int = 0) -> RequestOutput:
    """Finished beams as one finished RequestOutput (vLLM's server shape): output i is the i-th best beam."""
    outputs = [
        CompletionOutput(index=i, text=sequence.text or "", token_ids=sequence.output_token_ids,
                         cumulative_logprob=sequence.cum_logprob, logprobs=sequence.logprobs,
                         finish_reason=sequence.finish_reason or "length")
        for i, sequence in enumerate(sequences)
    ]
    return RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                         prompt_logprobs=None, outputs=outputs, finished=True, num_cached_tokens=num_cached_tokens)
