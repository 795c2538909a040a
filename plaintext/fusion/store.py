"""Content-addressed store of chunk KV caches with a memory tier and a disk tier.

A chunk cache is the per-layer K and V of one token span prefilled *alone* at positions ``0..n-1`` (the
canonical form, keys post-RoPE); :mod:`mpckv.plaintext.fusion.rerotate` moves it to any offset. The store
key is a sha256 over the model fingerprint (architecture, RoPE configuration, dtype, a weight sample) and
the token ids, so a cache is never reused across models, RoPE settings or dtypes. Python's ``hash()`` is
never used (it is salted per process).

Tiers and policies (CacheBlend, Yao et al., EuroSys 2025, §5; Continuum's TTL pins, arXiv 2511.02230):

* memory: an LRU dict with a byte budget; entries in use (reference count > 0) or pinned are never evicted;
* disk: one safetensors file per key under ``directory/<2 hex>/<key>.safetensors``, a byte budget, LRU by
  modification time (touched on every hit). Files are written to a temporary name in the same directory
  and renamed into place (atomic on POSIX), so two processes sharing a directory never see a partial file.
  Every file carries the key, the model fingerprint, the token ids and a sha256 of the tensor bytes in its
  metadata; a truncated, bit-flipped or mismatched file is counted as ``corrupt``, deleted and treated as a
  miss (the caller recomputes it), never used.

Deviations from the papers: no GPU/pinned-CPU split (one memory tier on the model's device), no background
writer (writes are synchronous), no layer-wise load iterator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpckv.errors import ConfigError

_FORMAT = "mpckv-chunk-kv/2"  # /2: chunks computed behind the sink prefix (assemble.sink_prefix)


@dataclass
class ChunkKV:
    """One chunk cache in canonical form: ``k, v [L, Hk, n, d]``, keys rotated at positions ``0..n-1``."""

    key: str
    token_ids: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class StoreStats:
    """Counters of one :class:`ChunkKVStore` (this process only)."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    corrupt: int = 0
    puts: int = 0
    memory_evictions: int = 0
    disk_evictions: int = 0
    bytes_loaded: int = 0
    bytes_written: int = 0

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hits": self.hits, "hit_rate": round(self.hit_rate, 4)}


def model_fingerprint(model: Any) -> str:
    """sha256 over the model's config (RoPE included), dtype, source and a sample of its weights."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    h.update(str(getattr(model, "source", None)).encode())
    samples = [model.embed_tokens, *(lw.k_proj for lw in model.layers), *(lw.v_proj for lw in model.layers)]
    for t in samples:
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1)[:2048].float().cpu().contiguous()
            h.update(flat.numpy().tobytes())
    return h.hexdigest()


def chunk_key(fingerprint: str, token_ids: Sequence[int]) -> str:
    """The store key of ``token_ids`` under a model fingerprint (64 hex digits)."""
    h = hashlib.sha256(_FORMAT.encode())
    h.update(fingerprint.encode())
    h.update(json.dumps([int(t) for t in token_ids]).encode())
    return h.hexdigest()


def _digest(k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (k, v):
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ChunkKVStore:
    """Two-tier LRU store of :class:`ChunkKV` (see the module docstring).

    Parameters
    ----------
    fingerprint:
        :func:`model_fingerprint` of the model the caches belong to (part of every key and checked on load).
    directory:
        Disk tier root; ``None`` for memory only. Several processes may share it.
    memory_bytes, disk_bytes:
        Byte budgets of the two tiers (K and V bytes; a chunk larger than a budget is not kept in that tier).
    device:
        Where loaded chunks are placed.
    clock:
        Time source for TTL pins (seconds); injectable for tests.
    """

    fingerprint: str
    directory: str | Path | None = None
    memory_bytes: int = 1 << 30
    disk_bytes: int = 16 << 30
    device: torch.device | str = "cpu"
    clock: Callable[[], float] = time.monotonic
    stats: StoreStats = field(default_factory=StoreStats)

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ConfigError("store byte budgets must be >= 0")
        self._mem: OrderedDict[str, ChunkKV] = OrderedDict()
        self._refs: dict[str, int] = {}
        self._pins: dict[str, float] = {}
        if self.directory is not None:
            self.directory = Path(self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ keys and sizes
    def key(self, token_ids: Sequence[int]) -> str:
        return chunk_key(self.fingerprint, token_ids)

    @property
    def memory_used(self) -> int:
        return sum(c.nbytes for c in self._mem.values())

    def disk_used(self) -> int:
        return sum(size for _, _, size in self._disk_files())

    def __contains__(self, key: str) -> bool:
        path = self._path(key)
        return key in self._mem or (path is not None and path.is_file())

    def in_memory(self, key: str) -> bool:
        return key in self._mem

    # ------------------------------------------------------------------ pins and references
    def pin(self, key: str, ttl_s: float) -> None:
        """Keep ``key`` in memory (never evicted) for ``ttl_s`` seconds from now."""
        if ttl_s <= 0:
            raise ConfigError(f"pin TTL must be positive, got {ttl_s}")
        self._pins[key] = self.clock() + ttl_s

    def unpin(self, key: str) -> None:
        self._pins.pop(key, None)

    def pinned(self, key: str) -> bool:
        until = self._pins.get(key)
        if until is None:
            return False
        if self.clock() >= until:
            del self._pins[key]
            return False
        return True

    def pinned_bytes(self) -> int:
        """Bytes of memory-tier entries under a live pin."""
        return sum(c.nbytes for k, c in self._mem.items() if self.pinned(k))

    def refcount(self, key: str) -> int:
        return self._refs.get(key, 0)

    @contextlib.contextmanager
    def use(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold references on ``keys`` (no eviction of those entries while inside)."""
        for k in keys:
            self._refs[k] = self._refs.get(k, 0) + 1
        try:
            yield
        finally:
            for k in keys:
                left = self._refs.get(k, 1) - 1
                if left > 0:
                    self._refs[k] = left
                else:
                    self._refs.pop(k, None)

    def _protected(self, key: str) -> bool:
        return self.refcount(key) > 0 or self.pinned(key)

    # ------------------------------------------------------------------ get / put
    def get(self, key: str) -> ChunkKV | None:
        """The cached chunk (memory, then disk) or ``None``; disk hits are verified and promoted."""
        hit = self._mem.get(key)
        if hit is not None:
            self._mem.move_to_end(key)
            self.stats.memory_hits += 1
            return hit
        loaded = self._load(key)
        if loaded is None:
            self.stats.misses += 1
            return None
        self.stats.disk_hits += 1
        self.stats.bytes_loaded += loaded.nbytes
        self._remember(loaded)
        return loaded

    def put(self, chunk: ChunkKV, *, ttl_s: float | None = None) -> None:
        """Insert into memory (LRU) and write through to disk; ``ttl_s`` pins it."""
        if chunk.key != self.key(chunk.token_ids):
            raise ConfigError("chunk key does not match its token ids under this store's fingerprint")
        self.stats.puts += 1
        if ttl_s is not None:
            self.pin(chunk.key, ttl_s)
        self._remember(chunk)
        self._write(chunk)

    def get_or_compute(
        self, token_ids: Sequence[int], compute: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[ChunkKV, bool]:
        """``(chunk, hit)``: the stored cache of ``token_ids`` or ``compute(token_ids) -> (k, v)`` stored."""
        key = self.key(token_ids)
        hit = self.get(key)
        if hit is not None:
            return hit, True
        k, v = compute(token_ids)
        chunk = ChunkKV(key, tuple(int(t) for t in token_ids), k, v)
        self.put(chunk)
        return chunk, False

    def evict(self, key: str) -> None:
        """Drop ``key`` from both tiers (pins and references are ignored)."""
        self._mem.pop(key, None)
        path = self._path(key)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------------ memory tier
    def _remember(self, chunk: ChunkKV) -> None:
        if chunk.nbytes > self.memory_bytes:
            return
        self._mem[chunk.key] = chunk
        self._mem.move_to_end(chunk.key)
        used = self.memory_used
        for key in list(self._mem):
            if used <= self.memory_bytes:
                break
            if key == chunk.key or self._protected(key):
                continue
            used -= self._mem.pop(key).nbytes
            self.stats.memory_evictions += 1

    # ------------------------------------------------------------------ disk tier
    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        return Path(self.directory) / key[:2] / f"{key}.safetensors"

    def _disk_files(self) -> list[tuple[float, Path, int]]:
        if self.directory is None:
            return []
        out = []
        for path in Path(self.directory).glob("*/*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                out.append((st.st_mtime, path, st.st_size))
        return sorted(out)

    def _write(self, chunk: ChunkKV) -> None:
        from safetensors.torch import save_file

        path = self._path(chunk.key)
        if path is None or chunk.nbytes > self.disk_bytes:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        k, v = chunk.k.detach().contiguous().cpu(), chunk.v.detach().contiguous().cpu()
        meta = {
            "format": _FORMAT,
            "key": chunk.key,
            "fingerprint": self.fingerprint,
            "token_ids": json.dumps(list(chunk.token_ids)),
            "sha256": _digest(k, v),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{chunk.key[:16]}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"k": k, "v": v}, tmp, metadata=meta)
            os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.stats.bytes_written += chunk.nbytes
        self._trim_disk(keep=path)

    def _trim_disk(self, keep: Path) -> None:
        files = self._disk_files()
        used = sum(size for _, _, size in files)
        for _, path, size in files:
            if used <= self.disk_bytes:
                break
            if path == keep or self._protected(path.stem):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                self.stats.disk_evictions += 1
            used -= size

    def _load(self, key: str) -> ChunkKV | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            chunk = self._read_verified(path, key)
        except FileNotFoundError:
            return None  # removed by another process between the check and the read
        if chunk is None:
            self.stats.corrupt += 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # LRU by modification time
        return chunk

    def _read_verified(self, path: Path, key: str) -> ChunkKV | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                k, v = f.get_tensor("k"), f.get_tensor("v")
        except FileNotFoundError:
            raise
        except Exception:  # truncated or garbled header / data: never use it
            return None
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            return None
        if meta.get("fingerprint") != self.fingerprint or meta.get("sha256") != _digest(k, v):
            return None
        try:
            ids = tuple(int(t) for t in json.loads(meta["token_ids"]))
        except (KeyError, ValueError, TypeError):
            return None
        if self.key(ids) != key or k.shape != v.shape or k.dim() != 4 or k.shape[2] != len(ids):
            return None
        return ChunkKV(key, ids, k.to(self.device), v.to(self.device))
