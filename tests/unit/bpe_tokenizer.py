"""A test double of pagedllm.tokenizer.Tokenizer over a real byte-level BPE trained in-process."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers


class BpeTokenizer:
    """The attributes and methods of pagedllm's Tokenizer that the engine's output side uses."""

    def __init__(self, backend: HFTokenizer, special_tokens: list[str]) -> None:
        self.backend = backend
        self.eos_token_id = backend.token_to_id("<|endoftext|>")
        self.all_special_ids = {backend.token_to_id(t) for t in special_tokens}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def id_to_text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)


def train_byte_level_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str]) -> BpeTokenizer:
    """A small byte-level BPE: every byte is a token, so rare characters split across tokens."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return BpeTokenizer(backend, special_tokens)
