"""An on-disk store of recorded dense prefills, so that two ``mpckv eval`` runs over the same prompts (say the
eviction methods and then the selection methods at 4K tokens) pay for each batch's dense prefill once.

A record is keyed by everything its tensors depend on: the model's id (its weight files' digest), dtype and
device, the batch's token ids, the torch version and the source of the modules that compute a prefill
(model, attention, RoPE, backend, engine). Any change to one of them is a new key, never a stale hit. Files
are ``<key>.pt`` (``torch.save`` of the record's tensors; ~2.3 GB per 10 samples of 4K tokens on a 0.5B
model in bfloat16) written atomically; the store never deletes anything (remove the directory to reclaim
the space).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mpckv.errors import ConfigError

_SOURCES = ("model.py", "attention.py", "rope.py", "backend.py", "engine.py")


def _code_digest() -> str:
    import mpckv.plaintext as pt

    h = hashlib.sha256(torch.__version__.encode())
    root = Path(pt.__file__).parent
    for name in _SOURCES:
        h.update((root / name).read_bytes())
    return h.hexdigest()


def record_key(model_id: str, dtype: str, device: str, ids: list[list[int]]) -> str:
    """The file stem of a record of the prompts ``ids`` on this model, dtype, device and code."""
    blob = json.dumps([model_id, dtype, device, _code_digest(), ids], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RecordStore:
    """``load(key)`` / ``save(key, record)`` of :class:`~mpckv.plaintext.engine.PrefillRecord` files."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the prefill record directory {self.root}: {exc}") from exc

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Any:
        """The stored record, or ``None`` when there is none (or the file cannot be read)."""
        from mpckv.plaintext.engine import PrefillRecord

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
            fields = (d["lengths"], d["keys"], d["values"], d["queries"], d["logits"], d["seconds"])
            return PrefillRecord(*fields)
        except Exception:  # a truncated or foreign file: recompute (and overwrite) instead of failing the run
            return None

    def save(self, key: str, record: Any) -> None:
        fields = ("lengths", "keys", "values", "queries", "logits", "seconds")
        tmp = self.path(key).with_suffix(".tmp")
        torch.save({f: getattr(record, f) for f in fields}, tmp)
        os.replace(tmp, self.path(key))
