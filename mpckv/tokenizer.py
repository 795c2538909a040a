"""Tokenizers: a built-in byte-level tokenizer, ``tokenizer.json`` through the ``tokenizers`` package, or
one rebuilt from a GGUF file's metadata (:mod:`mpckv.gguf_tokenizer`).

The byte tokenizer maps each UTF-8 byte to its value (ids 0–255); decoding drops ids outside that range
and replaces invalid UTF-8. It is what the shipped tiny model and random test checkpoints use.

Every tokenizer has ``encode(text)`` (no special tokens added), ``decode(ids)`` (special tokens
dropped), ``chat_template`` (a Jinja string or ``None``), ``apply_chat_template(messages)``,
``bos_token_id``, ``add_bos_token`` and ``stop_token_ids`` (EOS plus end-of-turn tokens such as
``<|im_end|>``). Chat templates are rendered as transformers renders them: a sandboxed Jinja
environment with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception`` and a ``tojson`` filter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from mpckv.errors import CheckpointError, ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "render_chat_template"]


class Tokenizer(Protocol):
    chat_template: str | None
    bos_token_id: int | None
    add_bos_token: bool
    stop_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary of at least 256); no chat template, no special tokens."""

    chat_template: str | None = None
    bos_token_id: int | None = None
    add_bos_token: bool = False

    def __init__(self, vocab_size: int = 256):
        if vocab_size < 256:
            raise ConfigError(
                f"the byte tokenizer needs a vocabulary of at least 256 ids; this model has {vocab_size} "
                "(pass token ids directly or ship a tokenizer.json)"
            )
        self.vocab_size = vocab_size
        self.stop_token_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise ConfigError("the byte tokenizer has no chat template; format the prompt yourself")


def render_chat_template(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    **special: Any,
) -> str:
    """Render an HF/GGUF chat template in a sandboxed Jinja environment (``special``: bos_token, …)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 comes with transformers / torch
        raise ConfigError("rendering a chat template needs the `jinja2` package") from exc

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return str(
            env.from_string(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special
            )
        )
    except TemplateError as exc:
        raise ConfigError(f"cannot render the chat template: {exc}") from exc


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus the fields of an HF ``tokenizer_config.json``.

    Parameters
    ----------
    path_or_tokenizer:
        A ``tokenizer.json`` path, or a ``tokenizers.Tokenizer`` object.
    config:
        ``tokenizer_config.json`` contents (``chat_template``, ``bos_token``, ``eos_token``,
        ``add_bos_token``, optional ``stop_tokens``); read from next to ``tokenizer.json`` when ``None``.
    eos_token_id:
        Extra EOS id(s) from the model config, added to :attr:`stop_token_ids`.
    """

    def __init__(
        self,
        path_or_tokenizer: str | Path | Any,
        config: dict[str, Any] | None = None,
        eos_token_id: int | list[int] | None = None,
    ):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise CheckpointError("reading tokenizer.json needs the `tokenizers` package") from exc
        if isinstance(path_or_tokenizer, str | Path):
            path = Path(path_or_tokenizer)
            try:
                self._tok = _Tok.from_file(str(path))
            except Exception as exc:
                raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
            if config is None:
                config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        else:
            self._tok = path_or_tokenizer
        cfg = config or {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows a list of named templates; take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_token_id: int | None = self._id(self.bos_token)
        self.add_bos_token = bool(cfg.get("add_bos_token", False)) and self.bos_token_id is not None
        stops: list[int] = []
        for name in [
            self.eos_token,
            *cfg.get("stop_tokens", []),
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
        ]:
            i = self._id(_token_str(name))
            if i is not None and i not in stops:
                stops.append(i)
        extra = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.stop_token_ids: list[int] = stops + [i for i in extra if i not in stops]

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (``[{"role": ..., "content": ...}]``) in the model's format.

        Raises :class:`~mpckv.errors.ConfigError` when the model ships no chat template.
        """
        if self.chat_template is None:
            raise ConfigError("this tokenizer has no chat template; format the prompt yourself")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):  # HF's serialized AddedToken
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return raw if isinstance(raw, dict) else {}


def load_tokenizer(source: str | Path | None, vocab_size: int) -> Tokenizer:
    """The tokenizer of a model ``source`` (what :func:`mpckv.load_model` stores in ``model.source``).

    ``source`` may be an HF directory (``tokenizer.json`` and ``tokenizer_config.json``), a ``.gguf``
    file or a directory holding one, or an installable model name; anything else (``None``, a
    directory without a tokenizer) gives the byte tokenizer.
    """
    if source is None:
        return ByteTokenizer(vocab_size)
    from mpckv.gguf_loader import find_gguf
    from mpckv.models import is_model_name, model_path

    if is_model_name(source):
        source = model_path(str(source))
    p = Path(source)
    if (p / "tokenizer.json").exists():
        return HFTokenizer(p / "tokenizer.json")
    gguf_file = find_gguf(p) if p.exists() else None
    if gguf_file is not None:
        from mpckv.gguf_cache import gguf_hf_tokenizer

        return gguf_hf_tokenizer(gguf_file)
    return ByteTokenizer(vocab_size)
