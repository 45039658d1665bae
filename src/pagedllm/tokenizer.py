"""Tokenizer: a `tokenizers.Tokenizer` built from a GGUF file or an HF model directory, plus chat templates.

BOS: the tokenizer adds BOS exactly when the model's own tokenizer does. For a GGUF file that is the
`tokenizer.ggml.add_bos_token` flag (default: on for SentencePiece "llama" vocabularies, off for
byte-level "gpt2" ones, as llama.cpp does); for an HF directory it is the tokenizer.json post-processor,
overridden by an explicit `add_bos_token` in tokenizer_config.json. The embedded SmolLM2 GGUF says
False, and transformers' GGUF tokenizer adds no BOS either; its chat template writes its own markers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

# Special tokens that end a turn in common chat formats; they stop generation when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>")

# llama.cpp token types (tokenizer.ggml.token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as the original tokenizers split text.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEXES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# These split every digit apart before GPT-2's regex (llama.cpp's "\p{N}" rule).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)  # unprintable bytes move past Latin-1
            extra += 1
    return table


class Tokenizer:
    """Encodes, decodes and renders chat templates for one model; wraps a `tokenizers.Tokenizer`."""

    def __init__(self, backend: BackendTokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 extra_eos_token_ids: set[int] | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False, special_tokens: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        end_of_turn = {backend.token_to_id(t) for t in END_OF_TURN_TOKENS} & self.all_special_ids
        self.eos_token_ids: set[int] = ({eos_token_id} if eos_token_id is not None else set()) | end_of_turn
        self.eos_token_ids |= extra_eos_token_ids or set()
        # Template variables: bos_token, eos_token, unk_token, pad_token (token strings).
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        for name, token_id in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            if token_id is not None and name not in self.special_tokens:
                self.special_tokens[name] = backend.id_to_token(token_id)
        self._id_text: dict[int, str] = {}

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={sorted(self.eos_token_ids)}, add_bos_token={self.add_bos_token})")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where this model's tokenizer does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of token ids."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Vocabulary strings of token ids (byte-level spelling, e.g. 'Ġworld')."""
        return [self.backend.id_to_token(i) for i in ids]

    def id_to_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (for logprob display); a partial UTF-8 byte shows as '�'."""
        text = self._id_text.get(token_id)
        if text is None:
            text = self.backend.decode([token_id], skip_special_tokens=False)
            token = self.backend.id_to_token(token_id) or ""
            # SentencePiece decoders strip the leading space of a sequence's first token; keep it here.
            if token.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            self._id_text[token_id] = text
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """Render a conversation with the model's Jinja chat template, as transformers does.

        Messages whose content is a list of {"type": "text", "text": ...} parts get the texts joined
        by newlines. Extra keyword arguments (tools, documents, enable_thinking, ...) reach the template.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("This model has no chat template (none in its GGUF metadata or tokenizer_config.json); "
                             "pass chat_template=... or use plain-text completion instead.")
        variables = {**self.special_tokens, **kwargs}
        rendered = _compile_chat_template(template).render(
            messages=[_normalize_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt, **variables)
        # The template writes the special tokens itself, so none are added on top.
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Drop None fields (OpenAI clients send content=None) and join text content parts into one string."""
    if not isinstance(message, dict):
        raise TypeError(f"A chat message must be a dict with 'role' and 'content', got {type(message).__name__}.")
    message = {k: v for k, v in message.items() if v is not None}
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"Message content part of type {kind!r} is not supported: "
                                 "this engine serves text-only models, so only {'type': 'text'} parts are accepted.")
            texts.append(part["text"])
        message["content"] = "\n".join(texts)
    return message


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker in some templates) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the globals transformers' templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _set_post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None,
                        add_bos: bool, add_eos: bool) -> None:
    """Make `encode(add_special_tokens=True)` add BOS and/or EOS, and nothing else."""
    single, specials = "$A", []
    if add_bos and bos is not None:
        single = f"{bos} {single}"
        specials.append((bos, backend.token_to_id(bos)))
    if add_eos and eos is not None:
        single = f"{single} {eos}"
        specials.append((eos, backend.token_to_id(eos)))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1", special_tokens=list(dict.fromkeys(specials)))


def _merges(meta: dict[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges from the file, or (SentencePiece files without them) derived from token scores."""
    if "tokenizer.ggml.merges" in meta:
        return [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("The GGUF tokenizer has neither merges nor scores; cannot build a BPE model.")
    ranked = []
    for token, token_id in vocab.items():
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))]
        splits = sorted((pair for pair in splits if pair[0] in vocab and pair[1] in vocab),
                        key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((float(scores[token_id]), left, right) for left, right in splits)
    # Best-scored merged piece first; among splits of one piece, longer left parts first. The sort is
    # stable, so remaining ties keep vocabulary order (this is the order transformers derives).
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _byte_level_backend(meta: dict[str, Any], tokens: list[str], token_types: list[int]) -> BackendTokenizer:
    """GPT-2 style byte-level BPE ('gpt2' vocabularies), split the way `tokenizer.ggml.pre` names."""
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    # Tokens a converter stored as plain text (spaces, ...) are respelled in the byte alphabet.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab, _merges(meta, vocab)))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLIT_REGEXES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # A control token written outside the byte alphabet is a converter mislabel; adding it would
    # create an id past the model's vocabulary.
    special = [t for t, ty in zip(tokens, token_types) if ty in (_UNKNOWN, _CONTROL) and set(t) <= alphabet]
    _add_gguf_added_tokens(backend, special, tokens, token_types, vocab)
    return backend


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str], token_types: list[int]) -> BackendTokenizer:
    """SentencePiece-style BPE with byte fallback ('llama' vocabularies): '▁' marks spaces."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    backend = BackendTokenizer(models.BPE(vocab, _merges(meta, vocab), byte_fallback=True, fuse_unk=True,
                                          unk_token=tokens[unk_id] if unk_id is not None else None))
    prefix = "first" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prefix, split=False)
    strip = [decoders.Strip(" ", 1, 0)] if prefix == "first" else []  # undo the prepended space
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), *strip])
    special = [t for t, ty in zip(tokens, token_types) if ty in (_UNKNOWN, _CONTROL)]
    _add_gguf_added_tokens(backend, special, tokens, token_types, vocab)
    return backend


def _add_gguf_added_tokens(backend: BackendTokenizer, special: list[str], tokens: list[str],
                           token_types: list[int], vocab: dict[str, int]) -> None:
    """Match control tokens whole as special tokens, user-defined ones (e.g. `<think>`) as plain added tokens."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user_defined = [t for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])


def _tokenizer_from_gguf(path: str) -> Tokenizer:
    """Build the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata."""
    from pagedllm.loader.gguf_loader import read_gguf

    meta = read_gguf(path).metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if tokens is None or kind not in ("gpt2", "llama"):
        raise ValueError(f"GGUF file {path} has no tokenizer pagedllm can build (tokenizer.ggml.model={kind!r}; "
                         "supported: 'gpt2' byte-level BPE and 'llama' SentencePiece BPE). Pass --tokenizer DIR.")
    token_types = meta.get("tokenizer.ggml.token_type")
    token_types = token_types.tolist() if token_types is not None else [1] * len(tokens)
    build = _byte_level_backend if kind == "gpt2" else _sentencepiece_backend
    backend = build(meta, tokens, token_types)

    def token_of(key: str) -> tuple[int | None, str | None]:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (int(token_id), tokens[int(token_id)]) if token_id is not None else (None, None)

    (bos_id, bos), (eos_id, eos) = token_of("bos"), token_of("eos")
    # llama.cpp's default when the flag is missing: BOS for SentencePiece vocabularies only.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    _set_post_processor(backend, bos, eos, add_bos, bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    # llama.cpp's own end-of-generation markers, when the converter recorded them.
    extra_eos = {int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta}
    named = (("bos_token", bos), ("eos_token", eos), ("unk_token", token_of("unknown")[1]),
             ("pad_token", token_of("padding")[1]))
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_id=eos_id, extra_eos_token_ids=extra_eos,
                     chat_template=meta.get("tokenizer.chat_template"), add_bos_token=add_bos,
                     special_tokens={name: tok for name, tok in named if tok is not None})


def _read_json(path: str) -> dict[str, Any]:
    """A JSON file's object, or {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-like dict."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template_of(folder: str, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template of an HF directory, wherever transformers versions put it."""
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
    template = template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _tokenizer_from_hf_dir(folder: str) -> Tokenizer:
    """Build the tokenizer of an HF model directory (tokenizer.json, else transformers' AutoTokenizer)."""
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
    chat_template = _chat_template_of(folder, config)
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        backend = BackendTokenizer.from_file(tokenizer_json)
    else:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise ValueError(f"No usable tokenizer in {folder}: no tokenizer.json, and transformers could not "
                             f"load one ({exc}).") from exc
        backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if backend is None:
            raise ValueError(f"The tokenizer in {folder} has no fast (Rust) backend; save it with "
                             "transformers to produce a tokenizer.json.")
        chat_template = chat_template or getattr(hf, "chat_template", None)
        special_map = {**{k: getattr(hf, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                          if getattr(hf, k, None)}, **special_map}
    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if token is not None:
            specials[name] = token
    bos_id = backend.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
    eos_id = backend.token_to_id(specials["eos_token"]) if "eos_token" in specials else None
    # The post-processor decides what encode() adds; an explicit flag in tokenizer_config.json wins.
    probe = backend.encode("a", add_special_tokens=True).ids
    add_bos = bos_id is not None and probe[:1] == [bos_id]
    add_eos = eos_id is not None and probe[-1:] == [eos_id]
    wanted_bos, wanted_eos = config.get("add_bos_token", add_bos), config.get("add_eos_token", add_eos)
    if (wanted_bos, wanted_eos) != (add_bos, add_eos):
        _set_post_processor(backend, specials.get("bos_token"), specials.get("eos_token"), wanted_bos, wanted_eos)
    extra_eos: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        ids = _read_json(os.path.join(folder, name)).get("eos_token_id")
        if ids is not None:
            extra_eos |= set(ids) if isinstance(ids, list) else {ids}
            break  # generation_config.json is what generation uses; config.json is the fallback
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_id=eos_id, extra_eos_token_ids=extra_eos,
                     chat_template=chat_template, add_bos_token=bool(wanted_bos and bos_id is not None),
                     special_tokens=specials)


def get_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a model: a .gguf file or a Hugging Face model directory."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _tokenizer_from_gguf(path)
    if os.path.isdir(path):
        has_files = any(os.path.isfile(os.path.join(path, name)) for name in
                        ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
        if has_files:
            return _tokenizer_from_hf_dir(path)
        ggufs = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
        if len(ggufs) == 1:
            return _tokenizer_from_gguf(os.path.join(path, ggufs[0]))
    raise ValueError(f"No tokenizer found at {path!r}: expected a .gguf file or a directory with tokenizer.json "
                     "(or tokenizer_config.json with vocabulary files transformers can load).")
