"""Tokenizers: a built-in byte-level tokenizer, or ``tokenizer.json`` through the ``tokenizers`` package.

The byte tokenizer maps each UTF-8 byte to its value (ids 0–255); decoding drops ids outside that range
and replaces invalid UTF-8. It is what the shipped tiny model and random test checkpoints use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mpckv.errors import CheckpointError, ConfigError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary of at least 256)."""

    def __init__(self, vocab_size: int = 256):
        if vocab_size < 256:
            raise ConfigError(
                f"the byte tokenizer needs a vocabulary of at least 256 ids; this model has {vocab_size} "
                "(pass token ids directly or ship a tokenizer.json)"
            )
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wrapper around ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json``."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise CheckpointError("reading tokenizer.json needs the `tokenizers` package") from exc
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def load_tokenizer(model_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """``tokenizer.json`` in ``model_dir`` when present, else the byte tokenizer."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return HFTokenizer(Path(model_dir) / "tokenizer.json")
    return ByteTokenizer(vocab_size)
