"""Helpers shared by the eval runner and the fidelity check: model id, tokenisation, cache statistics."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpckv.errors import CheckpointError, ConfigError
from mpckv.tokenizer import ByteTokenizer

_CHUNK = 1 << 16


def checkpoint_dir(model: str | Path) -> Path:
    """The directory behind ``--model`` (``"tiny"`` → the shipped model)."""
    from mpckv.checkpoint import TINY_DIR

    root = TINY_DIR if str(model) == "tiny" else Path(model).expanduser()
    if not (root / "config.json").is_file():
        if str(model) == "tiny":
            raise CheckpointError(
                f"the shipped tiny model is not present at {root}; train it or pass a checkpoint directory"
            )
        raise CheckpointError(f"{root} is not a checkpoint directory (no config.json)")
    return root


def _digest_file(h: Any, f: Path) -> None:
    size = f.stat().st_size
    h.update(f"{f.name}:{size}".encode())
    with f.open("rb") as fh:
        h.update(fh.read(_CHUNK))
        fh.seek(max(0, size - _CHUNK))
        h.update(fh.read(_CHUNK))


def model_id(model: str | Path) -> str:
    """A short stable id of a checkpoint: ``<name>-<digest>``.

    HF directories: the digest covers ``config.json`` and, for every ``*.safetensors`` file, its size and
    its first and last 64 KiB, so that retrained weights in the same directory get a new id (and new result
    cells) while a copied directory keeps it; ``name`` is ``tiny`` for the shipped model, else the directory
    name. Installable model names (``smollm2``, ...) and GGUF files: the GGUF file's size, first and last
    64 KiB; ``name`` is the model name or the file's stem.
    """
    from mpckv.gguf_loader import find_gguf
    from mpckv.models import is_model_name, model_path

    if is_model_name(model):
        h = hashlib.sha1()
        _digest_file(h, model_path(str(model)))
        return f"{model}-{h.hexdigest()[:10]}"
    gguf = find_gguf(model) if str(model) != "tiny" and Path(model).expanduser().exists() else None
    if gguf is not None:
        h = hashlib.sha1()
        _digest_file(h, gguf)
        return f"{gguf.stem}-{h.hexdigest()[:10]}"
    root = checkpoint_dir(model)
    h = hashlib.sha1((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        _digest_file(h, f)
    name = "tiny" if str(model) == "tiny" else root.resolve().name
    return f"{name}-{h.hexdigest()[:10]}"


def load(model: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """``(LlamaModel, tokenizer)`` for ``--model``; checks CUDA before loading."""
    import torch

    from mpckv.checkpoint import load_model
    from mpckv.tokenizer import load_tokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available")
    m = load_model(model, dtype=dtype, device=device)
    return m, load_tokenizer(getattr(m, "source", None), m.config.vocab_size)


def encode(tokenizer: Any, model: Any, text: str, bos: bool) -> list[int]:
    """Token ids of ``text``; with ``bos``, subword models get their BOS token first (byte models none)."""
    ids = list(tokenizer.encode(text))
    bos_id = model.config.bos_token_id
    if bos and bos_id is not None and not isinstance(tokenizer, ByteTokenizer):
        ids = [int(bos_id), *ids]
    return ids


def stop_tokens(tokenizer: Any, model: Any) -> list[int]:
    """EOS plus the newline token (answers end at the first newline)."""
    newline = list(tokenizer.encode("\n"))
    return sorted(set(model.config.stop_token_ids) | (set(newline) if len(newline) == 1 else set()))


def cache_stats(session: Any, stats: Any) -> dict[str, float]:
    """Per-sample cache statistics of one engine run.

    ``read_fraction`` is the mean number of entries read per decode step and layer (``read_per_layer``),
    relative to what dense attention reads at the same steps; with no decode step it is the kept fraction.
    Byte counts are per sample (the batch's allocated and live cache divided by the batch size).
    """
    b = max(1, len(stats.prompt_lengths))
    steps = int(session.step)
    dense_now = float(session.dense_lengths.float().mean()) if session.dense_lengths is not None else 1.0
    if steps:
        read = sum(session.read_sums) / (len(session.read_sums) * steps)
        dense_read = dense_now - (steps - 1) / 2
    else:
        read = sum(stats.kept_per_layer) / max(1, len(stats.kept_per_layer))
        dense_read = dense_now
    return {
        "kept_fraction": float(stats.kept_fraction),
        "read_fraction": read / max(dense_read, 1.0),
        "cache_bytes": stats.cache_bytes / b,
        "live_cache_bytes": stats.live_cache_bytes / b,
        "dense_cache_bytes": stats.dense_cache_bytes / b,
    }


def mean_stats(parts: Sequence[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """Average :func:`cache_stats` of several batches, weighted by batch size (bytes rounded to ints)."""
    total = sum(w for w, _ in parts)
    keys = parts[0][1].keys() if parts else []
    out: dict[str, Any] = {k: sum(w * d[k] for w, d in parts) / max(total, 1) for k in keys}
    for k in ("cache_bytes", "live_cache_bytes", "dense_cache_bytes"):
        if k in out:
            out[k] = round(out[k])
    for k in ("kept_fraction", "read_fraction"):
        if k in out:
            out[k] = round(out[k], 5)
    return out


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    """Split ``items`` into consecutive chunks of at most ``size`` (``0`` = one chunk)."""
    items = list(items)
    if size <= 0 or size >= len(items):
        return [items] if items else []
    return [items[i : i + size] for i in range(0, len(items), size)]


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a temporary file then a rename), so an interrupted run leaves valid files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
