"""Incremental detokenization of one request, with stop-string detection and hold-back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.tokenizer import Tokenizer

# The stream is primed with at least this many trailing prompt tokens (fewer if the prompt is
# shorter), and never more than the maximum: enough context for decoders whose output depends on
# the previous token (Metaspace drops the space of the very first token, WordPiece joins "##").
_MIN_PRIMING_TOKENS = 4
_MAX_PRIMING_TOKENS = 16
_REPLACEMENT_CHAR = "\ufffd"


def _clean_prompt_suffix(tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special: bool) -> list[int]:
    """The shortest trailing slice of the prompt (>= a few tokens) that decodes to valid UTF-8.

    A slice that starts or ends inside a multi-byte character would give DecodeStream a prefix
    with replacement characters, and its first emitted piece would then repeat prompt text.
    """
    n = len(prompt_token_ids)
    for length in range(min(n, _MIN_PRIMING_TOKENS), min(n, _MAX_PRIMING_TOKENS) + 1):
        suffix = prompt_token_ids[n - length :]
        if _REPLACEMENT_CHAR not in tokenizer.backend.decode(suffix, skip_special_tokens=skip_special):
            return suffix
    return []


class IncrementalDetokenizer:
    """Turns a request's new token ids into new text and finds stop strings in it.

    Text is appended only once its bytes form valid UTF-8 (a character split over several
    tokens appears with the token that completes it). Stop strings are searched in the newly
    added text plus the few characters before it that a stop string could start in. While a
    request runs, the tail of the text that could still be the start of a stop string is held
    back from `get_next_output_text`, so streamed text never shows a stop string that is later cut.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.stop: list[str] = list(params.stop or [])
        self.min_tokens = params.min_tokens
        # Output token ids seen so far, including a stop token that was not decoded.
        self.token_ids: list[int] = []
        self.output_text = ""
        # With include_stop_str_in_output the stop string stays in the text, so a partial one
        # shown early is never taken back: nothing needs holding.
        self._hold_back = bool(self.stop) and not self.include_stop_str_in_output
        self._last_output_text_offset = 0
        prime = _clean_prompt_suffix(tokenizer, prompt_token_ids, self.skip_special_tokens)
        self._stream = DecodeStream(ids=prime, skip_special_tokens=self.skip_special_tokens)
        # Ids fed to the stream that have not produced text yet (an incomplete character), and
        # the last id that did: used to flush the pending bytes when the request ends.
        self._pending_ids: list[int] = []
        self._last_emitting_id: int | None = prime[-1] if prime else None

    @property
    def num_output_tokens(self) -> int:
        """Number of output tokens seen so far (a skipped stop token included)."""
        return len(self.token_ids)

    def update(self, new_token_ids: list[int], stop_terminated: bool, finished: bool = False) -> str | None:
        """Append the text of `new_token_ids`; return the stop string it completed, if any.

        `stop_terminated`: the last id is the EOS / stop token that ended the request; its text
        is left out unless include_stop_str_in_output. `finished`: the engine core ended the
        request this step, so bytes still waiting to form a character are flushed as U+FFFD.
        On a stop-string hit `output_text` is truncated at the stop string (kept with
        include_stop_str_in_output) and the caller must finish the request.
        """
        if not new_token_ids:
            return None
        skipped_stop_token = None
        if stop_terminated and not self.include_stop_str_in_output:
            skipped_stop_token = new_token_ids[-1]
            new_token_ids = new_token_ids[:-1]

        # Text produced by the first min_tokens tokens can never end the request, so the search
        # window starts after it.
        check_offset = len(self.output_text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self.output_text += self._decode_next(token_id)
            if self.num_output_tokens <= self.min_tokens:
                check_offset = len(self.output_text)
        if skipped_stop_token is not None:
            self.token_ids.append(skipped_stop_token)
        if finished or stop_terminated:
            self.output_text += self._flush_pending()

        if not self.stop or self.num_output_tokens <= self.min_tokens:
            return None
        return self._check_stop_strings(check_offset)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to show now: all of it, or only what is new since the last delta call.

        While unfinished, a tail that could still grow into a stop string is held back.
        """
        visible = len(self.output_text) - (0 if finished else self._num_held_back_chars())
        if not delta:
            return self.output_text[:visible]
        start = self._last_output_text_offset
        if visible <= start:
            return ""
        self._last_output_text_offset = visible
        return self.output_text[start:visible]

    def _decode_next(self, token_id: int) -> str:
        """Feed one id to the stream; the text it completes ('' while a character is partial)."""
        try:
            piece = self._stream.step(self.tokenizer.backend, token_id)
        except Exception:
            # DecodeStream rejects a step whose decode no longer starts with its prefix (rare
            # decoder clean-ups). Restart unprimed rather than fail the request.
            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            piece = self._stream.step(self.tokenizer.backend, [*self._pending_ids, token_id])
        if piece is None:
            self._pending_ids.append(token_id)
            return ""
        self._pending_ids = []
        self._last_emitting_id = token_id
        return piece

    def _flush_pending(self) -> str:
        """Text of ids still waiting on more bytes, as a full decode would show it (with U+FFFD)."""
        if not self._pending_ids:
            return ""
        decode = self.tokenizer.backend.decode
        skip = self.skip_special_tokens
        pending, self._pending_ids = self._pending_ids, []
        if self._last_emitting_id is None:
            return decode(pending, skip_special_tokens=skip)
        # Decode with one token of context so a leading space is rendered as in a full decode.
        context = decode([self._last_emitting_id], skip_special_tokens=skip)
        text = decode([self._last_emitting_id, *pending], skip_special_tokens=skip)
        if text.startswith(context):
            return text[len(context) :]
        return decode(pending, skip_special_tokens=skip)

    def _check_stop_strings(self, check_offset: int) -> str | None:
        """Find the earliest stop string that ends after `check_offset`; truncate the text there."""
        text = self.output_text
        best: tuple[int, int, str] | None = None  # (start, end, stop string)
        for stop in self.stop:
            # A match must end in the new text, so it starts at most len(stop) - 1 chars before.
            start = text.find(stop, max(0, check_offset - len(stop) + 1))
            if start == -1:
                continue
            candidate = (start, start + len(stop), stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        start, end, stop = best
        self.output_text = text[: end if self.include_stop_str_in_output else start]
        return stop

    def _num_held_back_chars(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if not self._hold_back:
            return 0
        text = self.output_text
        longest = max(len(s) for s in self.stop) - 1
        for length in range(min(longest, len(text)), 0, -1):
            tail = text[len(text) - length :]
            if any(len(stop) > length and stop.startswith(tail) for stop in self.stop):
                return length
        return 0
