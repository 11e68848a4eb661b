"""A model's tokenizer: a thin, immutable wrapper over a Hugging Face ``tokenizers`` tokenizer.

Loads ``tokenizer.json`` (plus the optional ``tokenizer_config.json``) from a directory — Bios's
built-in tokenizer shipped in ``bios/data/tokenizer`` or a Hugging Face model directory — and offers
encode/decode and chat-template rendering with the same semantics as ``transformers``' fast
tokenizers. Depends only on the stdlib, ``tokenizers``, ``jinja2`` and ``bios.errors``.
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

from bios.errors import InvalidRequestError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value: Any) -> str | None:
    """The text of a special-token entry from tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _select_chat_template(value: Any) -> str | None:
    """The chat template in a config value: a string, or HF's list of named templates ("default" wins)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def _raise_exception(message: str) -> None:
    """Template helper: abort rendering with ``message`` (as Hugging Face templates expect)."""
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    """Template filter: JSON-encode ``value`` without HTML escaping (Hugging Face's ``tojson``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured like ``transformers`` (cached per source)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A model's tokenizer: encode/decode text and render chat templates. Immutable after construction."""

    __slots__ = ("_chat_template", "_config", "_name_or_path", "_special_ids", "_tokenizer")
    _tokenizer: _RustTokenizer
    _config: dict[str, Any]
    _chat_template: str | None
    _name_or_path: str
    _special_ids: dict[str, int | None]

    def __init__(
        self,
        tokenizer_json: str,
        config: Mapping[str, Any] | None = None,
        name_or_path: str = "",
        chat_template: str | None = None,
    ) -> None:
        """Build from the text of a tokenizer.json and the parsed tokenizer_config.json (if any).

        ``chat_template`` overrides the config's template. Raises ``ValueError`` if the JSON is not a
        valid tokenizer. Prefer :meth:`from_directory` or :meth:`builtin`.
        """
        try:
            tokenizer = _RustTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed input
            raise ValueError(f"invalid tokenizer.json for {name_or_path or 'tokenizer'}: {exc}") from exc
        config = dict(config or {})
        if chat_template is None:
            chat_template = _select_chat_template(config.get("chat_template"))
        specials = {key: _token_content(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        special_ids = {key: None if t is None else tokenizer.token_to_id(t) for key, t in specials.items()}
        set_ = object.__setattr__
        set_(self, "_tokenizer", tokenizer)
        set_(self, "_config", config)
        set_(self, "_chat_template", chat_template)
        set_(self, "_name_or_path", str(name_or_path))
        set_(self, "_special_ids", special_ids)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a directory holding tokenizer.json and optionally tokenizer_config.json.

        Hugging Face model directories work too (a ``chat_template.jinja`` file there takes precedence
        over the config's template). Raises ``FileNotFoundError`` if there is no tokenizer.json.
        """
        directory = os.fspath(path)
        tokenizer_path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"no tokenizer.json in {directory!r}")
        with open(tokenizer_path, encoding="utf-8") as f:
            tokenizer_json = f.read()
        config: dict[str, Any] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        template = None
        template_path = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        return cls(tokenizer_json, config, directory, chat_template=template)

    @classmethod
    def builtin(cls) -> Tokenizer:
        """The tokenizer shipped with Bios (byte-level BPE, 4096 tokens, ChatML); loaded once and shared."""
        return _load_builtin()

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including special and added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the config's ``bos_token``, or None if it has none."""
        return self._special_ids["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        """Id of the config's ``eos_token``, or None if it has none."""
        return self._special_ids["eos_token"]

    @property
    def pad_token_id(self) -> int | None:
        """Id of the config's ``pad_token``, or None if it has none."""
        return self._special_ids["pad_token"]

    @property
    def name_or_path(self) -> str:
        """The directory this tokenizer was loaded from."""
        return self._name_or_path

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; with ``add_special_tokens`` the post-processor's tokens (e.g. BOS) are added."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for ``tokens`` (any sequence of ints, numpy arrays included); inverts :meth:`encode` exactly."""
        return self._tokenizer.decode([int(t) for t in tokens], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of the single token ``token`` (vocabulary or added token), or None if it is not one."""
        return self._tokenizer.token_to_id(token)

    @overload
    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = ..., tokenize: Literal[True] = ...
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = ..., *, tokenize: Literal[False]
    ) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """Render ``messages`` with the chat template; token ids (no extra special tokens) or the string.

        Raises ``InvalidRequestError`` (a ``ValueError``) if this tokenizer has no chat template or the
        template fails to render.
        """
        if self._chat_template is None:
            raise InvalidRequestError(
                f"tokenizer {self._name_or_path or '<unnamed>'} has no chat_template; "
                "add one to its tokenizer_config.json to use chat messages",
                field="chat_template",
            )
        specials = {k: t for k in _SPECIAL_TOKEN_KEYS if (t := _token_content(self._config.get(k))) is not None}
        try:
            rendered = _compile_template(self._chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template of {self._name_or_path or '<unnamed>'} failed: {exc}") from exc
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def to_wire(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer elsewhere, as JSON data (see `from_wire`)."""
        return {
            "tokenizer_json": self._tokenizer.to_str(),
            "config": self._config,
            "name_or_path": self._name_or_path,
            "chat_template": self._chat_template,
        }

    @classmethod
    def from_wire(cls, payload: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer `to_wire` described."""
        return cls(
            payload["tokenizer_json"],
            payload.get("config"),
            payload.get("name_or_path", ""),
            payload.get("chat_template"),
        )

    def __reduce__(self):
        return (type(self).from_wire, (self.to_wire(),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name_or_path={self._name_or_path!r}, vocab_size={self.vocab_size})"


@functools.cache
def _load_builtin() -> Tokenizer:
    """Read the shipped tokenizer files through importlib.resources (works from wheels and zips)."""
    root = importlib.resources.files(__package__ or "bios") / "data" / "tokenizer"
    config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    return Tokenizer((root / "tokenizer.json").read_text(encoding="utf-8"), config, str(root))
