"""Text <-> token ids, streaming detokenization and chat templates.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` (the ``tokenizer.json`` of a Hugging
Face checkpoint) plus what ``tokenizer_config.json`` adds: special tokens and the Jinja
chat template, rendered the way transformers renders it (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, special tokens as variables).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class Tokenizer:
    """A byte-level/BPE (or any ``tokenizers``) tokenizer with chat-template support.

    ``special_tokens`` maps template variable names (``bos_token``, ``eos_token``, ...) to
    token strings; ``chat_template`` is a Jinja source or ``None``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        for name, token in self.special_tokens.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self._special_ids = frozenset(
            tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` and
        ``chat_template.jinja`` (which wins over the config's template) from ``path``."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{tok_file} not found: the engine needs a fast-tokenizer tokenizer.json "
                "(convert a slow tokenizer with transformers and save it next to the weights)")
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        special: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = cfg.get(key)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            if isinstance(value, str) and backend.token_to_id(value) is not None:
                special[key] = value
        return cls(backend, chat_template=template, special_tokens=special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token string, if the tokenizer has one."""
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token string (the chat turn terminator for chat models)."""
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of :attr:`bos_token`, or ``None``."""
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of :attr:`eos_token`, or ``None``."""
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special (control) token; ``skip_special_tokens`` drops these."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or ``None`` if unknown."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (byte-level symbols, not decoded text)."""
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` applies the tokenizer's
        post-processor (e.g. a leading BOS); special-token strings in ``text`` map to
        their ids. ``TypeError`` when ``text`` is not a ``str``; ``ValueError`` when it
        holds unpaired surrogates (undecodable bytes), which are not Unicode text."""
        _check_text(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` of many texts, in parallel inside ``tokenizers``."""
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
        encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte character) decodes to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) with the chat template,
        as transformers' ``apply_chat_template(tokenize=False)`` does. Keys whose value is
        ``None`` are dropped from each message; ``kwargs`` (e.g. ``tools``) become template
        variables and override the special-token variables."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass plain prompts or use a "
                             "checkpoint whose tokenizer_config.json sets chat_template")
        if not messages:
            raise ValueError("cannot render an empty conversation")
        clean = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TypeError(f"chat messages must be dicts, got {message!r}")
            clean.append({k: v for k, v in message.items() if v is not None})
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens}
        variables.update(kwargs)
        template = _compile(self.chat_template)
        return template.render(messages=clean, add_generation_prompt=add_generation_prompt,
                               **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat. The template writes its own special tokens, so
        the post-processor is not applied (as in transformers)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def _check_text(text: object, what: str = "text") -> None:
    """``TypeError`` unless ``text`` is a ``str``; ``ValueError`` when it holds a lone
    surrogate (U+D800..U+DFFF: what ``errors="surrogateescape"`` makes of undecodable
    bytes), which the tokenizer cannot encode."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}"
                        + (": decode the bytes to str first (e.g. .decode('utf-8'))"
                           if isinstance(text, bytes | bytearray) else ""))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"{what} holds an unpaired surrogate (U+{ord(bad):04X} at index {exc.start}), "
            "not valid Unicode: usually undecodable bytes (read with "
            "errors='surrogateescape', e.g. from stdin or a file name); decode the bytes "
            "with their real encoding or with errors='replace'") from None


class StreamDecoder:
    """Incremental detokenizer: feed generated ids, get back the text they add.

    Text is released only once it is final: a multi-byte UTF-8 character split across
    tokens is held back until its last byte arrives, and tokenizers that change a
    token's text with its left context (leading-space handling) are decoded with a
    window of preceding tokens. The concatenation of everything returned by
    :meth:`push` and :meth:`flush` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window (index into _ids)
        self._read_offset = 0  # ids before this have had their text released
        self._text: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """Text released so far."""
        return "".join(self._text)

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Append one or more ids; return the newly final text (possibly ``""``)."""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        if not full.startswith(prefix):
            # A tokenizer whose text of earlier ids changed with later ones: release the
            # difference against the whole-sequence decode instead.
            released = "".join(self._text)
            whole = self._decode(0, len(self._ids))
            new = whole[len(released):] if whole.startswith(released) else ""
        else:
            new = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text.append(new)
        return new

    def flush(self) -> str:
        """Release whatever is still held back (an incomplete character decodes to
        U+FFFD) and end the stream's pending state."""
        released = "".join(self._text)
        whole = self._decode(0, len(self._ids))
        new = whole[len(released):] if whole.startswith(released) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        if new:
            self._text.append(new)
        return new

    def _decode(self, start: int, stop: int) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=self._skip)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers in some
    templates): renders its body unchanged."""

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
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """Compile a chat template in transformers' sandboxed environment (cached)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
