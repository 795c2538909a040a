"""KV cache with per-layer, per-(sequence, KV head) lengths and real compaction.

Layout per layer: padded tensors ``k, v [B, Hk, cap, d]``, original token positions ``pos [B, Hk, cap]``
and per-entry metadata (scores, flags) of the same leading shape. ``lengths [B, Hk]`` says how many
entries of each row are live; everything at or beyond a row's length is garbage.

Compaction (:meth:`LayerCache.compact`) gathers the kept entries of every row to the front and
*reallocates* the tensors at the largest kept length, so evicted entries free memory rather than being
masked. Appends grow the capacity geometrically (amortised O(1)).
"""

from __future__ import annotations

from typing import Any

import torch

from mpckv.errors import ShapeError

_GROW_MIN = 64


class LayerCache:
    """The KV cache of one decoder layer."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.empty(batch, kv_heads, 0, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, kv_heads, dtype=torch.long, device=device)
        self.meta: dict[str, torch.Tensor] = {}
        self.version = 0  # bumped on every compaction: derived structures must be rebuilt

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    @property
    def element_bytes(self) -> int:
        return self.k.element_size()

    def keys(self) -> torch.Tensor:
        """Live view ``[B, Hk, max_length, d]``."""
        return self.k[:, :, : self.max_length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.max_length]

    def positions(self) -> torch.Tensor:
        return self.pos[:, :, : self.max_length]

    def valid(self) -> torch.Tensor:
        """Boolean ``[B, Hk, max_length]``: which slots are live."""
        idx = torch.arange(self.max_length, device=self.device)
        return idx[None, None, :] < self.lengths[..., None]

    def nbytes(self) -> int:
        """Bytes allocated by K, V, positions and metadata (capacity included)."""
        tensors = [self.k, self.v, self.pos, *self.meta.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def live_bytes(self) -> int:
        """Bytes of the live K and V entries only."""
        per_entry = 2 * self.head_dim * self.k.element_size()
        return int(self.lengths.sum()) * per_entry

    # ------------------------------------------------------------------ metadata
    def add_meta(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> torch.Tensor:
        """Register a per-entry metadata tensor ``[B, Hk, cap]`` that moves with compaction."""
        if name not in self.meta:
            self.meta[name] = torch.full(
                (self.batch, self.kv_heads, self.capacity), fill, dtype=dtype, device=self.device
            )
        return self.meta[name]

    # ------------------------------------------------------------------ writes
    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, self.capacity * 2, _GROW_MIN)
        grow = new_cap - self.capacity

        def pad(t: torch.Tensor) -> torch.Tensor:
            shape = list(t.shape)
            shape[2] = grow
            return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=2)

        self.k, self.v, self.pos = pad(self.k), pad(self.v), pad(self.pos)
        self.meta = {name: pad(t) for name, t in self.meta.items()}

    def append(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Append ``T`` entries per row: ``k_new, v_new [B, Hk, T, d]``, ``pos_new [B, T]``.

        ``counts [B]`` (default ``T``) says how many of the ``T`` are real for each sequence (right padding
        in a batched prefill); the rest are written but not counted live. New metadata entries are zero.
        """
        b, hk, t, d = k_new.shape
        if (b, hk, d) != (self.batch, self.kv_heads, self.head_dim) or v_new.shape != k_new.shape:
            raise ShapeError(
                f"append expects k/v [{self.batch}, {self.kv_heads}, T, {self.head_dim}], "
                f"got {tuple(k_new.shape)} / {tuple(v_new.shape)}"
            )
        if pos_new.shape != (b, t):
            raise ShapeError(f"pos_new must be [{b}, {t}], got {tuple(pos_new.shape)}")
        self._reserve(self.max_length + t)
        slots = self.lengths[..., None] + torch.arange(t, device=self.device)  # [B, Hk, T]
        self.k.scatter_(2, slots[..., None].expand(b, hk, t, d), k_new.to(self.dtype))
        self.v.scatter_(2, slots[..., None].expand(b, hk, t, d), v_new.to(self.dtype))
        self.pos.scatter_(2, slots, pos_new[:, None, :].expand(b, hk, t).to(torch.long))
        for m in self.meta.values():
            m.scatter_(2, slots, torch.zeros((), dtype=m.dtype, device=m.device).expand(b, hk, t))
        add = torch.full((b,), t, device=self.device, dtype=torch.long) if counts is None else counts.long()
        self.lengths += add.to(self.device)[:, None]

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep, per row, the entries at ``index [B, Hk, K]`` (in that order) and free the rest.

        ``valid [B, Hk, K]`` marks which index columns are real (rows may keep different counts; valid
        columns must come first). Tensors are reallocated at the new maximum length.
        """
        b, hk = self.batch, self.kv_heads
        if index.dim() != 3 or index.shape[:2] != (b, hk):
            raise ShapeError(f"compact index must be [{b}, {hk}, K], got {tuple(index.shape)}")
        if valid is None:
            valid = torch.ones_like(index, dtype=torch.bool)
        new_len = valid.sum(-1)
        kmax = int(new_len.max()) if new_len.numel() else 0
        index = index[..., :kmax].clamp(0, max(self.capacity - 1, 0))
        d = self.head_dim

        def take(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 4:
                return torch.gather(t, 2, index[..., None].expand(b, hk, kmax, d)).contiguous()
            return torch.gather(t, 2, index).contiguous()

        self.k, self.v, self.pos = take(self.k), take(self.v), take(self.pos)
        self.meta = {name: take(t) for name, t in self.meta.items()}
        self.lengths = new_len.to(torch.long)
        self.version += 1


class KVCache:
    """All layers' caches for one batch of sequences.

    Subclasses for other storage (the secure caches in :mod:`mpckv.protocols`) only replace
    :meth:`new_layer`; everything else (indexing, sizes) is shared.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, *args: Any):
        self.layers = [self.new_layer(batch, kv_heads, head_dim, *args) for _ in range(num_layers)]

    def new_layer(self, batch: int, kv_heads: int, head_dim: int, *args: Any) -> Any:
        dtype, device = args
        return LayerCache(batch, kv_heads, head_dim, dtype, device)

    def __getitem__(self, layer: int) -> Any:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    def live_bytes(self) -> int:
        return sum(c.live_bytes() for c in self.layers)

    def mean_lengths(self) -> list[float]:
        """Mean live entries per (sequence, KV head), one value per layer."""
        return [float(c.lengths.float().mean()) for c in self.layers]
