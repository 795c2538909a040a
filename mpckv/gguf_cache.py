"""GGUF → HF directory conversion, and the cache of converted GGUF files.

Parsing a GGUF's metadata with ``gguf.GGUFReader`` is slow for large vocabularies (~14 s for
Qwen2.5's 152K tokens and merges on our 2-core machine, plus ~6 s of numpy dequantization), so a GGUF
of 32 MB or more is converted once into an HF-layout directory under the model cache
(``$MPCKV_CACHE/gguf/<stem>-<key>``, else ``~/.cache/mpckv/gguf/…``; ``key`` hashes the file's
resolved path, size and modification time) and later loads read that directory (fp32 safetensors,
~1–3 s). Set ``MPCKV_GGUF_CACHE=0`` to always read the GGUF itself.

Every file of an entry is written atomically (temporary name, then rename); ``config.json`` is
written after ``model.safetensors`` and ``tokenizer_config.json`` after ``tokenizer.json``, so an entry
is complete for the model (tokenizer) exactly when ``config.json`` (``tokenizer_config.json``) exists.
Concurrent loaders at worst both convert; the last rename wins with identical content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mpckv.errors import CheckpointError
from mpckv.plaintext.model import LlamaModel
from mpckv.tokenizer import HFTokenizer

__all__ = ["CACHE_MIN_BYTES", "cache_entry", "convert_gguf", "gguf_hf_tokenizer", "load_gguf_cached"]

CACHE_MIN_BYTES = 32 << 20


def cache_enabled(path: Path) -> bool:
    """Whether loads of ``path`` go through the cache (size ≥ 32 MB and ``MPCKV_GGUF_CACHE`` not ``0``)."""
    if os.environ.get("MPCKV_GGUF_CACHE", "1") == "0":
        return False
    return path.stat().st_size >= CACHE_MIN_BYTES


def cache_entry(path: Path) -> Path:
    """The cache directory of a GGUF file (not created)."""
    from mpckv.models import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _atomic_write(dest: Path, write: Any) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        raise CheckpointError(f"cannot write {dest}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_tokenizer(reader: Any, path: Path, out: Path, context: int) -> None:
    from mpckv.gguf_tokenizer import gguf_tokenizer

    tok, cfg = gguf_tokenizer(reader, path)
    hf_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        **{k: v for k, v in cfg.items() if v is not None},
    }
    _atomic_write(out / "tokenizer.json", lambda p: tok.save(str(p)))
    _atomic_write(
        out / "tokenizer_config.json",
        lambda p: p.write_text(json.dumps(hf_cfg, indent=2, ensure_ascii=False), encoding="utf-8"),
    )


def convert_gguf(path: Path, out: Path, *, tokenizer: bool = True, model: bool = True) -> Path:
    """Write the HF-layout directory of a GGUF file: ``config.json``, ``model.safetensors`` (fp32),
    ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template)."""
    from mpckv.checkpoint import save_model
    from mpckv.gguf_loader import field, load_gguf, read_gguf

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create {out}: {exc} (set MPCKV_CACHE to a writable directory, or MPCKV_GGUF_CACHE=0)"
        ) from exc
    reader = read_gguf(path)
    if tokenizer:
        arch = field(reader, "general.architecture")
        _write_tokenizer(reader, path, out, int(field(reader, f"{arch}.context_length", 4096)))
    if model:
        m = load_gguf(path, torch.float32, "cpu", cache=False, reader=reader)
        staging = out / f".staging.{os.getpid()}"
        save_model(m, staging, extra_config={"mpckv_converted_from": path.name})
        _atomic_write(out / "model.safetensors", lambda p: os.replace(staging / "model.safetensors", p))
        _atomic_write(out / "config.json", lambda p: os.replace(staging / "config.json", p))
        staging.rmdir()
    return out


def load_gguf_cached(path: Path, dtype: torch.dtype, device: torch.device | str) -> LlamaModel:
    """Load ``path`` through its cache entry, converting it on first use."""
    from mpckv.checkpoint import load_model

    entry = cache_entry(path)
    if not (entry / "config.json").exists():
        convert_gguf(path, entry, tokenizer=not (entry / "tokenizer_config.json").exists())
    model = load_model(entry, dtype=dtype, device=device)
    model.source = str(path)
    return model


def gguf_hf_tokenizer(path: Path) -> HFTokenizer:
    """The tokenizer of a GGUF file, from its cache entry (written on first use) when caching applies."""
    if cache_enabled(path):
        entry = cache_entry(path)
        if not (entry / "tokenizer_config.json").exists():
            convert_gguf(path, entry, model=False)
        return HFTokenizer(entry / "tokenizer.json")
    from mpckv.gguf_loader import read_gguf
    from mpckv.gguf_tokenizer import gguf_tokenizer

    tok, cfg = gguf_tokenizer(read_gguf(path), path)
    return HFTokenizer(tok, cfg)
