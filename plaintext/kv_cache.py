"""KV cache with per-layer, per-(sequence, KV head) lengths and real compaction.

Layout per layer: padded tensors ``k, v [B, Hk, cap, d]``, original token positions ``pos [B, Hk, cap]``
and per-entry metadata (scores, flags) of the same leading shape. ``lengths [B, Hk]`` says how many
entries of each row are live; everything at or beyond a row's length is garbage.

Compaction (:meth:`LayerCache.compact`) gathers the kept entries of every row to the front and
*reallocates* the tensors at the largest kept length, so evicted entries free memory rather than being
masked. Appends grow the capacity in chunks of ``max(64, capacity / 16)`` entries, so that the allocated
K/V stay within ~6 % of the live ones (a doubling policy would allocate up to twice what is live) while a
long decode still reallocates only O(log n) times per doubling of the length (each growth copies the
cache once: ≤ 16 copies of every entry per doubling, amortised O(1) per append). :meth:`LayerCache.reserve`
preallocates when the final length is known (prompt + ``max_new_tokens``). :meth:`LayerCache.remove_one`
evicts one entry per row in O(d) by moving the row's last entry into the freed slot (StreamingLLM's
per-step eviction), instead of a compaction that copies the whole cache.
"""

from __future__ import annotations

from typing import Any

import torch

from mpckv.errors import ShapeError

_GROW_MIN = 64
_GROW_DIV = 16  # growth chunk = capacity / _GROW_DIV (at least _GROW_MIN entries)


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
    def reserve(self, total: int) -> None:
        """Preallocate room for ``total`` entries per row (e.g. prompt + ``max_new_tokens``): later appends up
        to that length do not reallocate. Never shrinks."""
        self._grow_to(int(total))

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self._grow_to(max(needed, self.capacity + max(_GROW_MIN, self.capacity // _GROW_DIV)))

    def _grow_to(self, new_cap: int) -> None:
        if new_cap <= self.capacity:
            return
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
        flat = self.lengths.flatten().tolist()
        n = max(flat) if flat else 0
        self._reserve(n + t)
        if counts is None and flat and all(x == n for x in flat):  # equal rows: plain slice copies
            self.k[:, :, n : n + t] = k_new
            self.v[:, :, n : n + t] = v_new
            self.pos[:, :, n : n + t] = pos_new[:, None, :]
            for m in self.meta.values():
                m[:, :, n : n + t] = 0
            self.lengths += t
            return
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

    def remove_slot(self, slot: int, length: int | None = None) -> None:
        """Evict slot ``slot`` of every row when all rows share one ``length`` (default: read it; see
        :meth:`remove_one`): the last entry moves into it with one slice copy per tensor."""
        n = self.max_length if length is None else length
        if not 0 <= slot < n:
            raise ShapeError(f"remove_slot: slot {slot} outside the live rows [0, {n})")
        for t in (self.k, self.v, self.pos, *self.meta.values()):
            t[:, :, slot] = t[:, :, n - 1]
        self.lengths -= 1
        self.version += 1

    def remove_one(self, slot: torch.Tensor) -> None:
        """Evict the entry at ``slot [B, Hk]`` of every row (negative: keep the row as is) in O(d) per row.

        The row's last live entry moves into the freed slot and the row shrinks by one, so the order of
        the entries changes (positions, metadata and K/V move together); nothing is reallocated.
        """
        b, hk = self.batch, self.kv_heads
        if tuple(slot.shape) != (b, hk):
            raise ShapeError(f"remove_one expects slots [{b}, {hk}], got {tuple(slot.shape)}")
        if self.capacity == 0:
            return
        slot = slot.to(device=self.device, dtype=torch.long)
        active = (slot >= 0) & (self.lengths > 0)
        last = (self.lengths - 1).clamp_min(0)
        dst = torch.where(active, slot, last)[..., None]  # inactive rows copy their last entry onto itself
        src = last[..., None]
        d = self.head_dim
        for name in ("k", "v"):
            t = getattr(self, name)
            t.scatter_(
                2, dst[..., None].expand(b, hk, 1, d), torch.gather(t, 2, src[..., None].expand(b, hk, 1, d))
            )
        self.pos.scatter_(2, dst, torch.gather(self.pos, 2, src))
        for m in self.meta.values():
            m.scatter_(2, dst, torch.gather(m, 2, src))
        self.lengths = self.lengths - active.long()
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
