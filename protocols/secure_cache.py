"""The KV cache over secret shares (stock path: K and V are plain CrypTensors).

Same interface as :class:`mpckv.plaintext.kv_cache.LayerCache` for what methods that run securely use:
``lengths`` / ``positions()`` are public (every party knows them), ``keys()`` / ``values()`` are secret,
``compact(index, valid)`` takes a *public* index (a public pattern such as StreamingLLM's), so gathering is
local to each party's shares and costs no communication. Batch size 1 only: secure generation serves one
private prompt at a time, so every row has the same (public) length.
"""

from __future__ import annotations

from typing import Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.plaintext.kv_cache import KVCache


class SecureLayerCache:
    """One layer's secret K/V with public lengths and positions."""

    pos: torch.Tensor
    lengths: torch.Tensor

    def __init__(self, batch: int, kv_heads: int, head_dim: int):
        if batch != 1:
            raise ConfigError("secure generation serves one prompt at a time (batch size 1)")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.k: Any = None
        self.v: Any = None
        self.pos = torch.zeros(batch, kv_heads, 0, dtype=torch.long)
        self.lengths = torch.zeros(batch, kv_heads, dtype=torch.long)
        self.meta: dict[str, Any] = {}
        self.version = 0
        self.device = torch.device("cpu")

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    @property
    def element_bytes(self) -> int:
        return 8  # int64 ring elements

    @property
    def capacity(self) -> int:
        return self.max_length

    def keys(self) -> Any:
        return self.k

    def values(self) -> Any:
        return self.v

    def positions(self) -> torch.Tensor:
        return self.pos

    def valid(self) -> torch.Tensor:
        return torch.ones(self.batch, self.kv_heads, self.max_length, dtype=torch.bool)

    def nbytes(self) -> int:
        """Bytes of this party's shares (int64 ring elements) plus the public positions."""
        n = 0 if self.k is None else 2 * self.k.numel() * 8
        return n + self.pos.numel() * 8

    def live_bytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * 8

    def add_meta(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> Any:
        raise ConfigError(
            "this method keeps per-entry scores, which the secure cache does not support yet; "
            "see the README's method table for what runs under MPC"
        )

    def append(
        self, k_new: Any, v_new: Any, pos_new: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        """Append ``T`` secret entries ``[1, Hk, T, d]`` at public positions ``pos_new [1, T]``."""
        from mpckv.protocols.compat import import_crypten

        crypten = import_crypten()
        b, hk, t, d = k_new.shape
        if (b, hk, d) != (self.batch, self.kv_heads, self.head_dim):
            raise ShapeError(
                f"append expects [1, {self.kv_heads}, T, {self.head_dim}], got {tuple(k_new.shape)}"
            )
        if counts is not None and bool((counts != t).any()):
            raise ShapeError("secure prefill takes one unpadded prompt")
        self.k = k_new if self.k is None else crypten.cat([self.k, k_new], dim=2)
        self.v = v_new if self.v is None else crypten.cat([self.v, v_new], dim=2)
        self.pos = torch.cat([self.pos, pos_new.long()[:, None, :].expand(b, hk, t)], dim=2)
        self.lengths = self.lengths + t

    @staticmethod
    def public_index(index: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Check a compaction index is public and rectangular; drop padding columns."""
        if not isinstance(index, torch.Tensor):
            raise ConfigError("secure compaction needs a public index (a secret selection is not supported)")
        if valid is not None and not bool(valid.all()):
            counts = valid.sum(-1)
            if bool((counts != counts.flatten()[0]).any()):
                raise ConfigError("secure compaction needs the same kept count in every row")
            index = index[..., : int(counts.flatten()[0])]
        return index.long()

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep the entries at the public ``index [1, Hk, K]`` (all rows must keep the same count)."""
        index = self.public_index(index, valid)
        b, hk, kk = index.shape
        gidx = index[..., None].expand(b, hk, kk, self.head_dim)
        self.k = self.k.gather(2, gidx)
        self.v = self.v.gather(2, gidx)
        self.pos = torch.gather(self.pos, 2, index)
        self.lengths = torch.full((b, hk), kk, dtype=torch.long)
        self.version += 1


class SecureKVCache(KVCache):
    """All layers' secure caches."""

    def new_layer(self, batch: int, kv_heads: int, head_dim: int, *args: Any) -> SecureLayerCache:
        return SecureLayerCache(batch, kv_heads, head_dim)
