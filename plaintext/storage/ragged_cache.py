"""Ragged rows: every (sequence, KV head) row stored back to back, no padding to the longest head.

Layout per layer: a :class:`RaggedRows` head — ``k, v [N, d]`` and positions ``[N]`` with
``N = Σ lengths``, rows in ``(b, hk)`` order, ``offsets [B, Hk]`` (first entry of each row) and
``lengths [B, Hk]`` — followed by a full-width tail :class:`~mpckv.plaintext.kv_cache.LayerCache` for the
decode tokens (one per row per step, so the tail has no padding during a decode). Head-adaptive budgets
(AdaKV) therefore save real memory: stored bytes are ``N·(2·d·e + 8) + 16·B·Hk`` plus the tail.

Decode attention over the head is vectorised per sequence without a padded copy of K/V: one product
``K_b [N_b, d] @ q_bᵀ [d, H]`` scores every entry of sequence ``b`` against all ``H`` query heads (each
entry then keeps the ``G`` columns of its own KV head), and the output is ``P_bᵀ @ V_b`` with ``P_b`` zero
outside each entry's own columns. This computes ``Hk`` times the needed dot products, but reads K and V
once (decode attention is bound by that read); the padded score view ``[B, Hk, G, L0]`` used for the one
softmax holds scalars only.
"""

from __future__ import annotations

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.storage.split_cache import HeadSegment, SplitCache


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    flat = lengths.reshape(-1)
    return (torch.cumsum(flat, 0) - flat).view(lengths.shape)


class RaggedRows(HeadSegment):
    """Flattened rows ``k, v [N, d]``, ``pos [N]`` with ``offsets`` / ``lengths [B, Hk]``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor):
        if k.shape[0] != int(lengths.sum()) or v.shape[0] != k.shape[0] or pos.shape != k.shape[:1]:
            raise ShapeError(
                f"ragged rows: k {tuple(k.shape)}, v {tuple(v.shape)}, Σ lengths {int(lengths.sum())}"
            )
        self.k, self.v, self.pos = k, v, pos
        self.lengths = lengths.to(torch.long)
        self.offsets = _offsets(self.lengths)

    @classmethod
    def gather(
        cls, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, index: torch.Tensor, counts: torch.Tensor
    ) -> RaggedRows:
        """Rows of the padded ``k, v [B, Hk, S, d]`` / ``pos [B, Hk, S]`` at ``index [B, Hk, K]`` (the first
        ``counts`` of each row, in that order)."""
        b, hk, s = pos.shape
        kk = index.shape[2]
        take = torch.arange(kk, device=index.device) < counts[..., None]
        rows = torch.arange(b * hk, device=index.device).view(b, hk, 1) * s
        flat = (rows + index.clamp(0, max(s - 1, 0)))[take]  # row-major: rows in (b, hk) order
        d = k.shape[-1]
        return cls(
            k.reshape(-1, d)[flat].contiguous(),
            v.reshape(-1, v.shape[-1])[flat].contiguous(),
            pos.reshape(-1)[flat].contiguous(),
            counts,
        )

    def _pad_index(self) -> tuple[torch.Tensor, int]:
        """Flat index of every entry in the padded ``[B·Hk·L0]`` view, and ``L0``."""
        l0 = self.max_length
        n = self.lengths.reshape(-1)
        row = torch.repeat_interleave(torch.arange(n.numel(), device=n.device), n)
        j = torch.arange(self.k.shape[0], device=n.device) - self.offsets.reshape(-1)[row]
        return row * l0 + j, l0

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        b, hk = self.lengths.shape
        idx, l0 = self._pad_index()
        out = torch.zeros(b * hk * l0, *x.shape[1:], dtype=x.dtype, device=x.device)
        out[idx] = x
        return out.view(b, hk, l0, *x.shape[1:])

    def _sequence_ranges(self) -> list[tuple[int, int]]:
        per_b = self.lengths.sum(1).tolist()
        out, start = [], 0
        for n in per_b:
            out.append((start, start + int(n)))
            start += int(n)
        return out

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        b, hk = self.lengths.shape
        h = q.shape[1]
        g = h // hk
        idx, l0 = self._pad_index()
        kv_head = (torch.arange(b * hk, device=q.device) % hk).repeat_interleave(self.lengths.reshape(-1))
        cols = kv_head[:, None] * g + torch.arange(g, device=q.device)  # [N, G] own query heads
        own = torch.empty(self.k.shape[0], g, device=q.device)
        for bi, (lo, hi) in enumerate(self._sequence_ranges()):
            if hi > lo:
                s_all = self.k[lo:hi].float() @ q[bi].float().T  # [N_b, H]
                own[lo:hi] = torch.gather(s_all, 1, cols[lo:hi])
        padded = torch.zeros(b * hk * l0, g, device=q.device)
        padded[idx] = own
        return padded.view(b, hk, l0, g).transpose(2, 3)

    def weighted_values(self, p: torch.Tensor) -> torch.Tensor:
        b, hk, g, l0 = p.shape
        idx, _ = self._pad_index()
        p_own = p.transpose(2, 3).reshape(b * hk * l0, g)[idx]  # [N, G]
        kv_head = (torch.arange(b * hk, device=p.device) % hk).repeat_interleave(self.lengths.reshape(-1))
        cols = kv_head[:, None] * g + torch.arange(g, device=p.device)
        d = self.v.shape[1]
        out = torch.zeros(b, hk * g, d, device=p.device)
        for bi, (lo, hi) in enumerate(self._sequence_ranges()):
            if hi > lo:
                p_full = torch.zeros(hi - lo, hk * g, device=p.device).scatter_(1, cols[lo:hi], p_own[lo:hi])
                out[bi] = p_full.T @ self.v[lo:hi].float()
        return out.view(b, hk, g, d)

    def keys(self) -> torch.Tensor:
        return self._padded(self.k)

    def values(self) -> torch.Tensor:
        return self._padded(self.v)

    def positions(self) -> torch.Tensor:
        return self._padded(self.pos)

    def take(self, index: torch.Tensor, counts: torch.Tensor) -> RaggedRows:
        kk = index.shape[2]
        take = torch.arange(kk, device=index.device) < counts[..., None]
        flat = (self.offsets[..., None] + index.clamp_min(0))[take]
        return RaggedRows(self.k[flat], self.v[flat], self.pos[flat], counts)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.k, self.v, self.pos, self.offsets, self.lengths)
        )

    def live_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class RaggedCache(SplitCache):
    """A layer cache whose rows (after a head-adaptive selection) are stored without padding.

    Decode attention without a keep mask or a selection runs row by row over contiguous views of the flat
    storage (``B·Hk`` small products per layer, no copy and no padding): on CPU this measured ~8× faster
    than the segment-op path of :class:`RaggedRows` (``SplitCache.attend``, used otherwise).
    """

    format_name = "ragged"

    def attend(
        self,
        q: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        need_probs: bool,
        index: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if keep is not None or index is not None or not isinstance(self.head, RaggedRows):
            return super().attend(q, scale, keep, need_probs, index, counts)
        b, h, _ = q.shape
        hk = self.kv_heads
        g = h // hk
        head, tail = self.head, self.tail
        qs = (q * scale).float()
        out = torch.empty(b, h, self.head_dim, dtype=torch.float32, device=q.device)
        probs = torch.zeros(b, h, self.max_length, device=q.device) if need_probs else None
        offs, n0s, n1s = head.offsets.tolist(), head.lengths.tolist(), tail.lengths.tolist()
        for bi in range(b):
            for hi in range(hk):
                lo, n0, n1 = offs[bi][hi], n0s[bi][hi], n1s[bi][hi]
                qg = qs[bi, hi * g : (hi + 1) * g]  # [G, d]
                kh, vh = head.k[lo : lo + n0].float(), head.v[lo : lo + n0].float()
                kt, vt = tail.k[bi, hi, :n1].float(), tail.v[bi, hi, :n1].float()
                if n0 + n1 == 0:
                    out[bi, hi * g : (hi + 1) * g] = 0.0
                    continue
                p = torch.softmax(torch.cat([qg @ kh.T, qg @ kt.T], dim=1), dim=1)  # [G, n0 + n1]
                out[bi, hi * g : (hi + 1) * g] = p[:, :n0] @ vh + p[:, n0:] @ vt
                if probs is not None:
                    probs[bi, hi * g : (hi + 1) * g, : n0 + n1] = p
        return out.to(q.dtype), probs

    @classmethod
    def from_selection(cls, lc: LayerCache, index: torch.Tensor, valid: torch.Tensor) -> RaggedCache:
        """Keep ``index [B, Hk, K]`` (valid columns first) of a dense ``lc`` as ragged rows."""
        if not isinstance(lc, LayerCache):
            raise ConfigError(
                f"the ragged layout is built from a dense layer cache, got {type(lc).__name__}; "
                "put the method that installs another storage format after adakv"
            )
        counts = valid.sum(-1).to(torch.long)
        head = RaggedRows.gather(lc.k, lc.v, lc.pos, index, counts)
        tail = LayerCache(lc.batch, lc.kv_heads, lc.head_dim, lc.dtype, lc.device)
        kmax = int(counts.max()) if counts.numel() else 0
        idx = index[..., :kmax].clamp(0, max(lc.capacity - 1, 0))
        meta = {name: torch.gather(m, 2, idx) for name, m in lc.meta.items()}
        return cls(head, tail, meta, lc.version + 1)


def ragged_cache_bytes(lengths: torch.Tensor, head_dim: int, element: int, tail: LayerCache) -> int:
    """The byte formula of a :class:`RaggedCache` without metadata."""
    n = int(lengths.sum())
    return n * (2 * head_dim * element + 8) + 16 * lengths.numel() + tail.nbytes()
