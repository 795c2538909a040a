"""Rebuild a ``tokenizers`` byte-level BPE tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary (``tokens``), the merge list
(``merges``), a type per token (``token_type``: 1 normal, 3 control, 4 user-defined), the special ids,
``add_bos_token`` and the name of the pre-tokenizer (``tokenizer.ggml.pre``), which selects the
splitting regular expressions llama.cpp applies before BPE (``llama-vocab.cpp``). We rebuild the same
pipeline with the ``tokenizers`` package:

* ``smollm`` (and ``gpt2``, ``starcoder``, ``default``): every digit on its own for ``smollm`` and
  ``starcoder`` (llama.cpp splits on ``\\p{N}`` first), then GPT-2's byte-level regex;
* ``qwen2`` (and ``deepseek-r1-qwen``): Qwen2's regex (single digits, letters with one leading
  non-letter, punctuation runs with their newlines) before byte-level mapping, and NFC normalization as
  in Qwen2's own ``tokenizer.json`` (llama.cpp does not normalize; the two differ only on
  non-NFC input);
* ``llama-bpe`` / ``llama3``: Llama 3's regex (digits in groups of up to three), merges ignored for
  whole-word vocabulary hits as in Llama 3's ``tokenizer.json``.

Control and user-defined tokens become added tokens (matched whole, never split). Only byte-level BPE
vocabularies (``tokenizer.ggml.model = gpt2``) are rebuilt; SentencePiece ones raise
:class:`~mpckv.errors.CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpckv.errors import CheckpointError

__all__ = ["PRE_TOKENIZERS", "gguf_tokenizer"]

_GPT2_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ``tokenizer.ggml.pre`` → (family, split digits individually first)
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": ("gpt2", False),
    "gpt2": ("gpt2", False),
    "smollm": ("gpt2", True),
    "starcoder": ("gpt2", True),
    "qwen2": ("qwen2", False),
    "deepseek-r1-qwen": ("qwen2", False),
    "llama-bpe": ("llama3", False),
    "llama3": ("llama3", False),
}

_STOP_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def _pipeline(family: str, digits: bool) -> tuple[Any, Any]:
    """``(normalizer or None, pre_tokenizer)`` of a family."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if family == "gpt2":
        steps: list[Any] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return None, pre_tokenizers.Sequence(steps)
    regex = _QWEN2 if family == "qwen2" else _LLAMA3
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return (normalizers.NFC() if family == "qwen2" else None), pre


def gguf_tokenizer(reader: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    """``(tokenizers.Tokenizer, tokenizer_config)`` described by a GGUF reader's metadata.

    ``tokenizer_config`` holds what an HF ``tokenizer_config.json`` would: ``chat_template``,
    ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` (strings), ``add_bos_token``,
    ``add_eos_token``, ``stop_tokens`` (EOS plus the end-of-turn tokens present).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from mpckv.gguf_loader import field

    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f"{path}: the GGUF file carries no tokenizer (tokenizer.ggml.model)")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "pass token ids or convert the tokenizer with transformers"
        )
    pre = str(field(reader, "tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: pre-tokenizer {pre!r} is not supported; mpckv knows {sorted(PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(field(reader, "tokenizer.ggml.tokens") or [])
    merges_raw: list[str] = list(field(reader, "tokenizer.ggml.merges") or [])
    types: list[int] = list(field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens or len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens/token_type are missing or of unequal length")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((a, b))
    family, digits = PRE_TOKENIZERS[pre]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=family == "llama3"
        )
    )
    normalizer, pre_tok = _pipeline(family, digits)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3
    ]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 4
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    def name(key: str) -> str | None:
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos = name("eos")
    stops = [t for t in ([eos] if eos else []) + [s for s in _STOP_NAMES if s in vocab]]
    config: dict[str, Any] = {
        "chat_template": field(reader, "tokenizer.chat_template"),
        "bos_token": name("bos"),
        "eos_token": eos,
        "pad_token": name("padding"),
        "unk_token": name("unknown"),
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "stop_tokens": list(dict.fromkeys(stops)),
    }
    return tok, config
