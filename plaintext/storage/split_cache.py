"""A layer cache in two parts: a *head* segment in a compact format plus a full-width *tail*.

Used by the channel-pruned (ThinK) and the ragged (AdaKV) formats. The logical layout of a row
``(b, hk)`` is the head's ``n0[b, hk]`` entries followed by the tail's ``n1[b, hk]`` entries, so logical
slot ``i`` is head slot ``i`` when ``i < n0`` and tail slot ``i − n0`` otherwise. The tail is a plain
:class:`~mpckv.plaintext.kv_cache.LayerCache`: decode tokens are appended there (one per row per step, so
it carries no padding in a decode). Positions are read through :meth:`positions`; per-entry metadata
(``meta``) is kept in the logical layout as padded ``[B, Hk, cap]`` tensors (small: one scalar per entry)
so that methods which update it in place (H2O's scores) work unchanged.

Decode attention (:meth:`SplitCache.attend`) scores the head with the format's own kernel
(:meth:`HeadSegment.scores`), the tail with a dense product, takes one softmax over both and returns the
probabilities in the logical layout when asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.plaintext.kv_cache import LayerCache


class HeadSegment(ABC):
    """The compact part of a :class:`SplitCache` (rows ``[B, Hk]`` of ``lengths`` entries)."""

    lengths: torch.Tensor  # [B, Hk]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    @abstractmethod
    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """Unscaled fp32 logits ``[B, Hk, G, L0]`` of ``q [B, H, d]`` (``L0 = max_length``; slots at or past
        a row's length are arbitrary and masked by the caller)."""

    @abstractmethod
    def weighted_values(self, p: torch.Tensor) -> torch.Tensor:
        """``Σ_j p[b, hk, g, j] · v_j`` in fp32, ``[B, Hk, G, d]`` (``p`` is 0 outside the rows)."""

    @abstractmethod
    def keys(self) -> torch.Tensor:
        """Reference keys ``[B, Hk, L0, d]`` (pruned channels zero-filled, ragged rows padded)."""

    @abstractmethod
    def values(self) -> torch.Tensor: ...

    @abstractmethod
    def positions(self) -> torch.Tensor: ...

    @abstractmethod
    def take(self, index: torch.Tensor, counts: torch.Tensor) -> HeadSegment:
        """A new segment with, per row, the entries at ``index [B, Hk, K]`` (the first ``counts``)."""

    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def live_bytes(self) -> int: ...


def logical_gather_index(n0: torch.Tensor, l0: int, length: int) -> torch.Tensor:
    """``[B, Hk, length]`` index into ``cat([head (l0 slots), tail], -1)`` for the logical layout."""
    i = torch.arange(length, device=n0.device)
    return torch.where(i < n0[..., None], i, l0 + i - n0[..., None])


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(-1, keepdim=True)``, ``-inf`` for an empty last dimension."""
    if x.shape[-1] == 0:
        return torch.full((*x.shape[:-1], 1), float("-inf"), dtype=x.dtype, device=x.device)
    return x.amax(-1, keepdim=True)


class SplitCache:
    """A head segment (:class:`HeadSegment`) followed by a full-width tail :class:`LayerCache`.

    Follows :class:`mpckv.plaintext.storage.base.AttendingCache`. ``remove_one`` / ``remove_slot`` are not
    supported (StreamingLLM's ring buffer needs the dense layout).
    """

    format_name = "split"

    def __init__(self, head: HeadSegment, tail: LayerCache, meta: dict[str, torch.Tensor], version: int):
        self.head, self.tail = head, tail
        self.batch, self.kv_heads, self.head_dim = tail.batch, tail.kv_heads, tail.head_dim
        self.dtype, self.device = tail.dtype, tail.device
        self.meta = meta
        self.version = version

    # ------------------------------------------------------------------ sizes and views
    @property
    def lengths(self) -> torch.Tensor:
        return self.head.lengths + self.tail.lengths

    @property
    def max_length(self) -> int:
        n = self.lengths
        return int(n.max()) if n.numel() else 0

    @property
    def capacity(self) -> int:
        return self.max_length

    @property
    def element_bytes(self) -> int:
        return self.tail.element_bytes

    def _logical(self, head: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """Merge per-part tensors ``[B, Hk, L0(, d)]`` / ``[B, Hk, L1(, d)]`` into the logical layout."""
        n0, l0, length = self.head.lengths, head.shape[2], self.max_length
        both = torch.cat([head, tail.to(head.dtype)], dim=2)
        if bool((n0 == l0).all()) and both.shape[2] == length:
            return both
        idx = logical_gather_index(n0, l0, length).clamp_max(max(both.shape[2] - 1, 0))
        if both.dim() == 4:
            idx4 = idx[..., None].expand(*idx.shape, both.shape[3])
            return torch.gather(both, 2, idx4)
        return torch.gather(both, 2, idx)

    def keys(self) -> torch.Tensor:
        """Reference keys ``[B, Hk, max_length, d]`` (a copy; pruned channels are zero)."""
        return self._logical(self.head.keys(), self.tail.keys())

    def values(self) -> torch.Tensor:
        return self._logical(self.head.values(), self.tail.values())

    def positions(self) -> torch.Tensor:
        return self._logical(self.head.positions(), self.tail.positions())

    # the dense cache's attribute names, for code that reads them (copies, not storage)
    @property
    def k(self) -> torch.Tensor:
        return self.keys()

    @property
    def v(self) -> torch.Tensor:
        return self.values()

    @property
    def pos(self) -> torch.Tensor:
        return self.positions()

    def valid(self) -> torch.Tensor:
        idx = torch.arange(self.max_length, device=self.device)
        return idx[None, None, :] < self.lengths[..., None]

    def nbytes(self) -> int:
        """Every byte held: the head's storage, the tail's (capacity included) and the metadata."""
        meta = sum(t.numel() * t.element_size() for t in self.meta.values())
        return self.head.nbytes() + self.tail.nbytes() + meta

    def live_bytes(self) -> int:
        """Bytes of the live K and V entries only (the head in its compact format)."""
        return self.head.live_bytes() + self.tail.live_bytes()

    # ------------------------------------------------------------------ metadata
    def add_meta(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> torch.Tensor:
        if name not in self.meta:
            shape = (self.batch, self.kv_heads, self.max_length)
            self.meta[name] = torch.full(shape, fill, dtype=dtype, device=self.device)
        return self.meta[name]

    # ------------------------------------------------------------------ writes
    def reserve(self, total: int) -> None:
        self.tail.reserve(max(int(total) - self.head.max_length, 0))

    def append(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Append to the full-width tail (new metadata entries are zero)."""
        old = self.lengths
        self.tail.append(k_new, v_new, pos_new, counts)
        if self.meta:
            t = k_new.shape[2]
            need = int(old.max()) + t if old.numel() else t
            slots = old[..., None] + torch.arange(t, device=self.device)
            for name, m in list(self.meta.items()):
                if m.shape[2] < need:
                    grow = torch.zeros(*m.shape[:2], need - m.shape[2], dtype=m.dtype, device=m.device)
                    m = torch.cat([m, grow], dim=2)
                m.scatter_(2, slots, torch.zeros((), dtype=m.dtype, device=m.device).expand_as(slots))
                self.meta[name] = m

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep the logical entries ``index [B, Hk, K]`` (valid columns first).

        Deviation from :meth:`LayerCache.compact`: kept head entries stay before kept tail entries (each
        part keeps the order given), so an index that interleaves the parts is reordered.
        """
        b, hk = self.batch, self.kv_heads
        if index.dim() != 3 or index.shape[:2] != (b, hk):
            raise ShapeError(f"compact index must be [{b}, {hk}, K], got {tuple(index.shape)}")
        if valid is None:
            valid = torch.ones_like(index, dtype=torch.bool)
        n0 = self.head.lengths[..., None]
        in_head = valid & (index < n0)
        in_tail = valid & (index >= n0)
        # stable partition: head entries first, then tail entries, then padding
        rank = torch.where(in_head, 0, torch.where(in_tail, 1, 2))
        order = torch.sort(rank, dim=-1, stable=True).indices
        index, rank = torch.gather(index, 2, order), torch.gather(rank, 2, order)
        c0, c1 = (rank == 0).sum(-1), (rank == 1).sum(-1)
        self.head = self.head.take(index, c0)
        col = torch.arange(index.shape[2], device=index.device)
        tail_col = (col + c0[..., None]).clamp_max(max(index.shape[2] - 1, 0))
        tail_idx = (torch.gather(index, 2, tail_col) - n0).clamp_min(0)
        tail_valid = col < c1[..., None]
        self.tail.compact(tail_idx, tail_valid)
        kept = c0 + c1
        kmax = int(kept.max()) if kept.numel() else 0
        idx = index[..., :kmax]
        self.meta = {
            name: torch.gather(m, 2, idx.clamp_max(max(m.shape[2] - 1, 0))) for name, m in self.meta.items()
        }
        self.version += 1

    def remove_one(self, slot: torch.Tensor) -> None:
        raise ConfigError(
            f"the {self.format_name} cache does not support per-step slot eviction (StreamingLLM's ring); "
            "run such a method without a storage format"
        )

    def remove_slot(self, slot: int, length: int | None = None) -> None:
        self.remove_one(torch.tensor(slot))

    # ------------------------------------------------------------------ attention
    def attend(
        self,
        q: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        need_probs: bool,
        index: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GQA decode attention of ``q [B, H, d]`` over the head (own scores) and the tail, one softmax.

        With a selection (``index``/``counts``) the rows are gathered from the reference :meth:`keys` /
        :meth:`values` (exact, not fast).
        """
        from mpckv.plaintext.attention import cache_attention

        if index is not None:
            assert counts is not None
            d = self.head_dim
            idx4 = index[..., None].expand(*index.shape, d)
            ks = torch.gather(self.keys(), 2, idx4)
            vs = torch.gather(self.values(), 2, idx4)
            return cache_attention(q, ks, vs, counts, scale, keep, need_probs)
        b, h, _ = q.shape
        hk = self.kv_heads
        g = h // hk
        n0, n1 = self.head.lengths, self.tail.lengths
        qs = q * scale  # fold the scale into the query (H·d work instead of H·L)
        s0 = self.head.scores(qs)  # [B, Hk, G, L0], a fresh tensor: updated in place below
        l0 = s0.shape[3]
        kt, vt = self.tail.keys(), self.tail.values()
        l1 = kt.shape[2]
        s1 = qs.float().view(b, hk, g, -1) @ kt.float().transpose(-1, -2)  # [B, Hk, G, L1]
        full0, full1 = bool((n0 == l0).all()), bool((n1 == l1).all())
        m0 = m1 = None
        if keep is not None or not full0:
            m0 = torch.arange(l0, device=q.device) < n0[..., None]
        if keep is not None or not full1:
            m1 = torch.arange(l1, device=q.device) < n1[..., None]
        if keep is not None:
            assert m0 is not None and m1 is not None
            keep = keep.to(torch.bool)
            lidx = logical_gather_index(n0, l0, self.max_length)
            lidx = torch.where(self.valid(), lidx, l0 + l1)  # padding slots go to a spare column
            k_both = torch.zeros(b, hk, l0 + l1 + 1, dtype=torch.bool, device=q.device)
            k_both.scatter_(2, lidx, keep)
            m0 = m0 & k_both[..., :l0]
            m1 = m1 & k_both[..., l0 : l0 + l1]
        if m0 is not None:
            s0.masked_fill_(~m0[:, :, None], float("-inf"))
        if m1 is not None:
            s1.masked_fill_(~m1[:, :, None], float("-inf"))
        mx = torch.maximum(_row_max(s0), _row_max(s1))
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p0, p1 = s0.sub_(mx).exp_(), s1.sub_(mx).exp_()
        den = (p0.sum(-1, keepdim=True) + p1.sum(-1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
        v1 = vt.float() if m1 is None else torch.where(m1[..., None], vt.float(), 0.0)
        out = (self.head.weighted_values(p0) + p1 @ v1) / den
        out = out.reshape(b, h, -1).to(q.dtype)
        if not need_probs:
            return out, None
        both = torch.cat([p0, p1], dim=3) / den  # [B, Hk, G, L0 + L1]
        idx = logical_gather_index(n0, l0, self.max_length).clamp_max(max(l0 + l1 - 1, 0))
        probs = torch.gather(both, 3, idx[:, :, None].expand(b, hk, g, idx.shape[2])).reshape(b, h, -1)
        probs = probs * self.valid().repeat_interleave(g, dim=1)
        return out, probs
