"""A layer cache with a full-precision store and a packed low-bit store (KIVI-style residual, MiKV classes).

Layout. Every row ``(b, hk)`` holds ``hi_len`` full-precision entries (a plain
:class:`~mpckv.plaintext.kv_cache.LayerCache`, ``self.hi``: the recent window / residual plus any entries a
method keeps in high precision) followed by ``lo_len`` quantized entries (``self.lo``, a
:class:`PackedStore`). The *logical* layout the engine and the methods see is ``[hi entries | lo entries]``
per row: logical index ``i < hi_len`` is ``hi[i]``, ``i ≥ hi_len`` is ``lo[i − hi_len]``.

New tokens are appended to the full-precision store; a method moves entries to the low-bit store with
:meth:`QuantizedLayerCache.demote` (quantized once, never promoted back). A *codec* turns a block of
entries into packed tensors and back (:class:`Codec`; the per-token RTN codec is :class:`TokenRTN`; the
VidKV per-channel codecs live in :mod:`mpckv.plaintext.storage.channel_codecs`). Codecs with a
``token_group > 1`` (per-channel quantization in groups of tokens) take entries in whole groups.

Attention (:meth:`QuantizedLayerCache.attend`) runs one softmax over both stores without building the
full-precision cache: per-token RTN codecs go through :func:`mpckv.kernels.quant_attention.quant_attention`
(scale folded into the dot products on CPU, Triton on CUDA); other codecs through their own ``scores`` /
``weighted``. With an empty low-bit store it is exactly the dense decode attention over ``hi``.

Bytes. ``nbytes()`` = ``hi.nbytes()`` (K, V, positions, metadata, capacity included) + every tensor of the
low-bit store (packed codes, scales, zeros, positions, capacity included) + the codecs' persistent
parameters (balancer, channel permutations). ``live_bytes()`` counts the live entries' K/V payload only
(full-precision K/V + packed codes + scales + zeros), as :meth:`LayerCache.live_bytes` does.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.kernels.decode_attention import decode_attention
from mpckv.kernels.quant_attention import (
    QuantSegment,
    dequantize_segment,
    merge_two_segments,
    quant_attention,
    segment_scores,
    segment_weighted,
)
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.storage import quant

_GROW_MIN = 64  # tokens


class Codec(Protocol):
    """Encodes entries ``[B, Hk, T, d]`` (``T`` a multiple of ``token_group``) into named tensors
    ``[B, Hk, T / token_group, …]`` and back."""

    token_group: int

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decode(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, Hk, U·token_group, d]`` fp32."""
        ...

    def scores(self, qg: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """``qg [B, Hk, G, d]`` fp32 → ``q·x̂ [B, Hk, G, U·token_group]``."""
        ...

    def weighted(self, p: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """``p [B, Hk, G, U·token_group]`` → ``Σ p·x̂ [B, Hk, G, d]``."""
        ...

    def state_tensors(self) -> list[torch.Tensor]:
        """Persistent parameters (counted in ``nbytes``)."""
        ...


class TokenRTN:
    """Per-token round-to-nearest codec: ``bits`` in 1..8 (planar packed for 1, 2, 4, 8 — those take the
    fused attention path —, a bit stream otherwise), one scale (+ zero) per group of ``group`` channels,
    parameters in ``param_dtype``; optional per-channel ``balance [B, Hk, d]`` (keys: the codes quantize
    ``x ⊙ balance``)."""

    token_group = 1

    def __init__(
        self,
        bits: int,
        group: int,
        dim: int,
        *,
        symmetric: bool = False,
        param_dtype: torch.dtype = torch.float16,
        balance: torch.Tensor | None = None,
    ):
        if bits not in range(1, 9):
            raise ConfigError(f"per-token codes need 1..8 bits, got {bits}")
        if group < 1 or dim % group:
            raise ConfigError(f"quantization group {group} must divide the head dimension {dim}")
        self.bits, self.group, self.dim, self.symmetric = bits, group, dim, symmetric
        self.param_dtype, self.balance = param_dtype, balance

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xf = x.float()
        if self.balance is not None:
            xf = xf * self.balance.float()[:, :, None, :]
        r = quant.quantize_rtn(
            xf, self.bits, self.group, symmetric=self.symmetric, param_dtype=self.param_dtype
        )
        enc = {"codes": quant.pack(r.codes, self.bits), "scale": r.scale}
        if r.zero is not None:
            enc["zero"] = r.zero
        return enc

    def segment(self, enc: dict[str, torch.Tensor]) -> QuantSegment:
        return QuantSegment(
            enc["codes"], enc["scale"], enc.get("zero"), self.bits, self.group, self.dim, self.balance
        )

    @property
    def planar(self) -> bool:
        return self.bits in quant.PLANAR_BITS

    def decode(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.planar:
            return dequantize_segment(self.segment(enc))
        codes = quant.unpack(enc["codes"], self.bits, self.dim)
        r = quant.RTN(codes, enc["scale"], enc.get("zero"), self.bits, self.group)
        x = quant.dequantize_rtn(r)
        return x if self.balance is None else x / self.balance.float()[:, :, None, :]

    def scores(self, qg: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.planar:
            return segment_scores(qg, self.segment(enc))
        return qg @ self.decode(enc).transpose(-1, -2)

    def weighted(self, p: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.planar:
            return segment_weighted(p, self.segment(enc))
        return p @ self.decode(enc)

    def state_tensors(self) -> list[torch.Tensor]:
        return [] if self.balance is None else [self.balance]


def _tensor_bytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class PackedStore:
    """Encoded K and V units ``[B, Hk, cap, …]`` (a unit = ``token_group`` entries), their positions
    ``[B, Hk, cap·token_group]`` and ``units [B, Hk]`` live units per row. Grows in chunks."""

    def __init__(self, batch: int, kv_heads: int, token_group: int, device: torch.device):
        self.batch, self.kv_heads, self.token_group, self.device = batch, kv_heads, token_group, device
        self.k: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.pos = torch.zeros(batch, kv_heads, 0, dtype=torch.long, device=device)
        self.units = torch.zeros(batch, kv_heads, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.pos.shape[2] // self.token_group

    @property
    def lengths(self) -> torch.Tensor:
        return self.units * self.token_group

    def live_k(self) -> dict[str, torch.Tensor]:
        n = int(self.units.max()) if self.units.numel() else 0
        return {name: t[:, :, :n] for name, t in self.k.items()}

    def live_v(self) -> dict[str, torch.Tensor]:
        n = int(self.units.max()) if self.units.numel() else 0
        return {name: t[:, :, :n] for name, t in self.v.items()}

    def _grow(self, needed: int, like_k: dict[str, torch.Tensor], like_v: dict[str, torch.Tensor]) -> None:
        if needed <= self.capacity and self.k:
            return
        chunk = max(max(1, _GROW_MIN // self.token_group), self.capacity // 16)  # ≥ 64 tokens, ~6 % slack
        new_cap = max(needed, self.capacity + chunk)

        def grown(t: torch.Tensor | None, like: torch.Tensor, per_unit: int = 1) -> torch.Tensor:
            shape = list(like.shape)
            shape[2] = new_cap * per_unit
            out = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if t is not None:
                out[:, :, : t.shape[2]] = t
            return out

        self.k = {n: grown(self.k.get(n), t) for n, t in like_k.items()}
        self.v = {n: grown(self.v.get(n), t) for n, t in like_v.items()}
        self.pos = _grow_pos(self.pos, new_cap * self.token_group)

    def append(
        self,
        enc_k: dict[str, torch.Tensor],
        enc_v: dict[str, torch.Tensor],
        pos: torch.Tensor,
        units: torch.Tensor,
    ) -> None:
        """Append ``U`` encoded units per row (``pos [B, Hk, U·token_group]``); only the first
        ``units [B, Hk]`` of them are live (the rest land beyond the row's length)."""
        u = next(iter(enc_k.values())).shape[2]
        if u == 0:
            return
        top = int(self.units.max()) if self.units.numel() else 0
        self._grow(top + u, enc_k, enc_v)
        slots = self.units[..., None] + torch.arange(u, device=self.device)  # [B, Hk, U]
        for store, enc in ((self.k, enc_k), (self.v, enc_v)):
            for name, t in enc.items():
                idx = slots.view(*slots.shape, *([1] * (t.dim() - 3))).expand_as(t)
                store[name].scatter_(2, idx, t.to(store[name].dtype))
        g = self.token_group
        tok = (slots[..., None] * g + torch.arange(g, device=self.device)).flatten(-2)
        self.pos.scatter_(2, tok, pos.to(torch.long))
        self.units = self.units + units.to(self.units)

    def take(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep units ``index [B, Hk, K]`` per row (valid first) and reallocate at the new size."""
        b, hk = self.batch, self.kv_heads
        new = valid.sum(-1)
        kmax = int(new.max()) if new.numel() else 0
        index = index[..., :kmax].clamp(0, max(self.capacity - 1, 0))

        def gather(t: torch.Tensor) -> torch.Tensor:
            idx = index.view(b, hk, kmax, *([1] * (t.dim() - 3))).expand(b, hk, kmax, *t.shape[3:])
            return torch.gather(t, 2, idx).contiguous()

        self.k = {n: gather(t) for n, t in self.k.items()}
        self.v = {n: gather(t) for n, t in self.v.items()}
        g = self.token_group
        tok = (index[..., None] * g + torch.arange(g, device=self.device)).flatten(-2)
        self.pos = torch.gather(self.pos, 2, tok).contiguous() if self.pos.shape[2] else self.pos
        self.units = new.to(torch.long)

    def nbytes(self) -> int:
        return _tensor_bytes([*self.k.values(), *self.v.values(), self.pos])

    def live_bytes(self) -> int:
        if not self.k:
            return 0
        per_unit = sum(t[0, 0, 0].numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])
        return int(self.units.sum()) * per_unit


def _rows(b: int, hk: int) -> list[tuple[int, int]]:
    return [(r, h) for r in range(b) for h in range(hk)]


def _grow_pos(pos: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(pos.shape[0], pos.shape[1], size, dtype=pos.dtype, device=pos.device)
    out[:, :, : pos.shape[2]] = pos
    return out


def assemble(hi: torch.Tensor, lo: torch.Tensor, hi_len: torch.Tensor, lo_len: torch.Tensor) -> torch.Tensor:
    """Logical layout ``[X_hi | X_lo]`` per row: ``hi [B, R, Lh, …]``, ``lo [B, R, Ll, …]``, lengths
    ``[B, R]`` → ``[B, R, max(hi_len + lo_len), …]`` (zeros past each row's length)."""
    b, r = hi_len.shape
    if bool((hi_len == hi.shape[2]).all()) and bool((lo_len == lo.shape[2]).all()):
        return torch.cat([hi, lo.to(hi.dtype)], dim=2)  # equal rows, every entry live: no scatter
    total = hi_len + lo_len
    n = int(total.max()) if total.numel() else 0
    rest = hi.shape[3:]
    out = torch.zeros(b, r, n + 1, *rest, dtype=hi.dtype, device=hi.device)
    lh = min(hi.shape[2], n)
    out[:, :, :lh] = hi[:, :, :lh]
    ll = lo.shape[2]
    if ll:
        j = torch.arange(ll, device=hi.device)
        slot = torch.where(j < lo_len[..., None], hi_len[..., None] + j, n)  # dead entries → spare slot n
        # hi garbage past hi_len is overwritten by the lo entries; clear what no lo entry covers
        out[:, :, :n] = torch.where(_mask(hi_len, n, rest), out[:, :, :n], 0)
        idx = slot.view(b, r, ll, *([1] * len(rest))).expand(b, r, ll, *rest)
        out.scatter_(2, idx, lo.to(out.dtype))
    else:
        out[:, :, :n] = torch.where(_mask(hi_len, n, rest), out[:, :, :n], 0)
    return out[:, :, :n]


def _mask(lengths: torch.Tensor, n: int, rest: Any) -> torch.Tensor:
    m = torch.arange(n, device=lengths.device)[None, None, :] < lengths[..., None]
    return m.view(*m.shape, *([1] * len(rest)))


class QuantizedLayerCache:
    """A full-precision store + a packed low-bit store behind the :class:`LayerCache` interface.

    Parameters
    ----------
    hi:
        The full-precision store (usually the layer's prompt cache, taken over as is, metadata included).
    key_codec, value_codec:
        Codecs of the low-bit store; they must share ``token_group``.
    drop:
        Discard demoted entries instead of storing them (the eviction baseline: ``mikv`` with
        ``low_bits=0`` is H2O).

    Notes
    -----
    ``meta`` is the full-precision store's metadata (over ``hi``'s slots; low-bit entries carry none).
    ``k`` / ``v`` / ``pos`` / ``keys()`` / ``values()`` assemble the logical layout (dequantizing): a
    reference path for tests and generic code, not for decode attention.
    """

    def __init__(self, hi: LayerCache, key_codec: Any, value_codec: Any, *, drop: bool = False):
        if key_codec.token_group != value_codec.token_group:
            raise ConfigError("key and value codecs must share token_group")
        self.hi = hi
        self.batch, self.kv_heads, self.head_dim = hi.batch, hi.kv_heads, hi.head_dim
        self.dtype, self.device = hi.dtype, hi.device
        self.key_codec, self.value_codec, self.drop = key_codec, value_codec, drop
        self.lo = PackedStore(hi.batch, hi.kv_heads, key_codec.token_group, hi.device)
        self.version = 0

    # ------------------------------------------------------------------ sizes
    @property
    def token_group(self) -> int:
        return int(self.lo.token_group)

    @property
    def meta(self) -> dict[str, torch.Tensor]:
        return self.hi.meta

    @property
    def lengths(self) -> torch.Tensor:
        return self.hi.lengths + self.lo.lengths

    @property
    def max_length(self) -> int:
        n = self.lengths
        return int(n.max()) if n.numel() else 0

    @property
    def capacity(self) -> int:
        return self.max_length

    @property
    def element_bytes(self) -> int:
        return self.hi.element_bytes

    def nbytes(self) -> int:
        extra = [*self.key_codec.state_tensors(), *self.value_codec.state_tensors()]
        return self.hi.nbytes() + self.lo.nbytes() + _tensor_bytes(extra)

    def live_bytes(self) -> int:
        return self.hi.live_bytes() + self.lo.live_bytes()

    # ------------------------------------------------------------------ logical views (reference)
    def _lo_decoded(self, which: str) -> torch.Tensor:
        codec = self.key_codec if which == "k" else self.value_codec
        enc = self.lo.live_k() if which == "k" else self.lo.live_v()
        if not enc:
            return torch.zeros(
                self.batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device
            )
        return codec.decode(enc).to(self.dtype)

    def keys(self) -> torch.Tensor:
        return assemble(self.hi.keys(), self._lo_decoded("k"), self.hi.lengths, self.lo.lengths)

    def values(self) -> torch.Tensor:
        return assemble(self.hi.values(), self._lo_decoded("v"), self.hi.lengths, self.lo.lengths)

    def positions(self) -> torch.Tensor:
        n = int(self.lo.lengths.max()) if self.lo.units.numel() else 0
        return assemble(self.hi.positions(), self.lo.pos[:, :, :n], self.hi.lengths, self.lo.lengths)

    k = property(keys)
    v = property(values)
    pos = property(positions)

    def valid(self) -> torch.Tensor:
        idx = torch.arange(self.max_length, device=self.device)
        return idx[None, None, :] < self.lengths[..., None]

    def is_low(self) -> torch.Tensor:
        """Bool ``[B, Hk, max_length]``: which logical entries are in the low-bit store."""
        idx = torch.arange(self.max_length, device=self.device)[None, None, :]
        return (idx >= self.hi.lengths[..., None]) & (idx < self.lengths[..., None])

    def add_meta(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> torch.Tensor:
        """Metadata over the full-precision store (see the class notes)."""
        return self.hi.add_meta(name, dtype, fill)

    # ------------------------------------------------------------------ writes
    def reserve(self, total: int) -> None:
        """No-op: the full-precision store stays small and the low-bit store grows in chunks."""
        return None

    def append(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> None:
        """New entries go to the full-precision store (as :meth:`LayerCache.append`)."""
        self.hi.append(k_new, v_new, pos_new, counts)

    def demote(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Move the full-precision entries at ``index [B, Hk, K]`` (``valid`` columns first, ascending) to
        the low-bit store (quantized once, in this order); each row's count must be a multiple of
        ``token_group`` (groups are formed from consecutive index columns)."""
        hi = self.hi
        b, hk = self.batch, self.kv_heads
        if index.shape[:2] != (b, hk) or valid.shape != index.shape:
            raise ShapeError(f"demote expects index/valid [{b}, {hk}, K], got {tuple(index.shape)}")
        counts = valid.sum(-1)
        g = self.token_group
        if bool((counts % g != 0).any()):
            raise ShapeError(f"demote: every row must move a multiple of token_group={g} entries")
        top = int(counts.max()) if counts.numel() else 0
        if top == 0:
            return
        index, valid = index[..., :top], valid[..., :top]  # valid columns come first: the rest is padding
        kk = top
        if not self.drop:
            kk_g = -(-kk // g) * g
            if kk_g != kk:
                index = torch.cat([index, index[..., -1:].expand(b, hk, kk_g - kk)], dim=-1)
                valid = torch.cat([valid, valid.new_zeros(b, hk, kk_g - kk)], dim=-1)
            d = self.head_dim
            gi = index.clamp(0, max(hi.capacity - 1, 0))
            ks = torch.gather(hi.k, 2, gi[..., None].expand(b, hk, kk_g, d))
            vs = torch.gather(hi.v, 2, gi[..., None].expand(b, hk, kk_g, d))
            ps = torch.gather(hi.pos, 2, gi)
            self.lo.append(self.key_codec.encode(ks), self.value_codec.encode(vs), ps, counts // g)
        # the full-precision store keeps its other live entries, in order
        n = hi.max_length
        moved = torch.zeros(b, hk, n + 1, dtype=torch.bool, device=self.device)
        moved.scatter_(2, torch.where(valid, index, n), True)
        keep = hi.valid() & ~moved[..., :n]
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
        hi.compact(order, torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).values.bool())
        self.version += 1

    def demote_one(self, slot: torch.Tensor) -> None:
        """:meth:`demote` of one entry per row, ``slot [B, Hk]``, when every full-precision row holds the same
        number of entries (the decode steady state): the same stores as ``demote(slot[..., None], …)``, but
        the later entries of each row shift down by one *in place*, so the full-precision store keeps its
        capacity (no reallocation here, none on the next append)."""
        hi = self.hi
        b, hk, d = self.batch, self.kv_heads, self.head_dim
        n = hi.max_length
        if tuple(slot.shape) != (b, hk) or self.token_group != 1 or bool((hi.lengths != n).any()):
            raise ShapeError(
                f"demote_one expects slots [{b}, {hk}], a per-token codec and equal full-precision rows"
            )
        slot = slot.to(device=self.device, dtype=torch.long)
        if not self.drop:
            gi = slot[..., None]
            ks = torch.gather(hi.k, 2, gi[..., None].expand(b, hk, 1, d))
            vs = torch.gather(hi.v, 2, gi[..., None].expand(b, hk, 1, d))
            ps = torch.gather(hi.pos, 2, gi)
            ones = torch.ones(b, hk, dtype=torch.long, device=self.device)
            self.lo.append(self.key_codec.encode(ks), self.value_codec.encode(vs), ps, ones)
        # the tail of each row moves down by one: slice copies (memcpy speed; a gather is ~10x slower)
        tensors = (hi.k, hi.v, hi.pos, *hi.meta.values())
        for (r, h), at in zip(_rows(b, hk), slot.flatten().tolist(), strict=True):
            if at < n - 1:
                for t in tensors:
                    t[r, h, at : n - 1] = t[r, h, at + 1 : n].clone()
        hi.lengths = hi.lengths - 1
        hi.version += 1
        self.version += 1

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep the logical entries ``index [B, Hk, K]`` (valid first): full-precision ones stay in the
        full-precision store, low-bit ones in the low-bit store (per-token codecs only)."""
        b, hk = self.batch, self.kv_heads
        if index.dim() != 3 or index.shape[:2] != (b, hk):
            raise ShapeError(f"compact index must be [{b}, {hk}, K], got {tuple(index.shape)}")
        if valid is None:
            valid = torch.ones_like(index, dtype=torch.bool)
        hl = self.hi.lengths[..., None]
        in_hi = valid & (index < hl)
        in_lo = valid & (index >= hl)
        if bool(in_lo.any()) and self.token_group != 1:
            raise ConfigError("compacting low-bit entries needs a per-token codec (token_group = 1)")

        def front(mask: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
            return torch.gather(idx, 2, order), torch.gather(mask, 2, order)

        i_hi, v_hi = front(in_hi, index)
        i_lo, v_lo = front(in_lo, index - hl)
        self.hi.compact(i_hi, v_hi)
        self.lo.take(i_lo.clamp_min(0), v_lo)
        self.version += 1

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
        """Decode attention over both stores (see the module docstring)."""
        hi, lo = self.hi, self.lo
        if index is not None:  # a selection: reference path over the dequantized rows it names
            b, hk, kk = index.shape
            d = self.head_dim
            ks = torch.gather(self.keys(), 2, index[..., None].expand(b, hk, kk, d))
            vs = torch.gather(self.values(), 2, index[..., None].expand(b, hk, kk, d))
            n = counts if counts is not None else torch.full((b, hk), kk, dtype=torch.long, device=q.device)
            return decode_attention(q, ks, vs, n, scale=scale, keep=keep, return_probs=need_probs)
        n_lo = int(lo.units.max()) if lo.units.numel() else 0
        lh = hi.max_length
        if n_lo == 0:  # nothing quantized: exactly the dense decode attention
            keep_hi = None if keep is None else keep[..., :lh]
            return decode_attention(
                q, hi.keys(), hi.values(), hi.lengths, scale=scale, keep=keep_hi, return_probs=need_probs
            )
        keep_hi = keep_lo = None
        if keep is not None:
            ll = n_lo * self.token_group
            j = torch.arange(ll, device=q.device)
            src = (hi.lengths[..., None] + j).clamp_max(keep.shape[2] - 1)
            keep_lo = torch.gather(keep, 2, src)
            keep_hi = keep[..., :lh]
        enc_k, enc_v = lo.live_k(), lo.live_v()
        kc, vc = self.key_codec, self.value_codec
        if isinstance(kc, TokenRTN) and isinstance(vc, TokenRTN) and kc.planar and vc.planar:
            out, p_hi, p_lo = quant_attention(
                q, hi.keys(), hi.values(), hi.lengths, self.key_codec.segment(enc_k),
                self.value_codec.segment(enc_v), lo.lengths, scale=scale, keep_hi=keep_hi, keep_lo=keep_lo,
                return_probs=need_probs,
            )  # fmt: skip
        else:
            out, p_hi, p_lo = self._attend_codecs(q, scale, keep_hi, keep_lo, need_probs, enc_k, enc_v)
        if p_hi is None or p_lo is None:
            return out, None
        g = q.shape[1] // self.kv_heads
        probs = assemble(p_hi, p_lo, hi.lengths.repeat_interleave(g, 1), lo.lengths.repeat_interleave(g, 1))
        return out, probs

    def _attend_codecs(
        self,
        q: torch.Tensor,
        scale: float,
        keep_hi: torch.Tensor | None,
        keep_lo: torch.Tensor | None,
        need_probs: bool,
        enc_k: dict[str, torch.Tensor],
        enc_v: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, h, d = q.shape
        hk = self.kv_heads
        qg = q.float().view(b, hk, h // hk, d)
        k_hi, v_hi = self.hi.keys(), self.hi.values()

        def hidden(lengths: torch.Tensor, keep: torch.Tensor | None, n: int) -> torch.Tensor:
            m = torch.arange(n, device=q.device)[None, None, :] < lengths[..., None]
            return ~(m if keep is None else m & keep)[:, :, None, :]

        def everything(lengths: torch.Tensor, keep: torch.Tensor | None, n: int) -> bool:
            return keep is None and (lengths.numel() == 0 or int(lengths.min()) >= n)

        l_hi = (qg @ k_hi.float().transpose(-1, -2)) * scale
        full_hi = everything(self.hi.lengths, keep_hi, k_hi.shape[2])
        if not full_hi:  # masks only where some entry is hidden
            l_hi = l_hi.masked_fill(hidden(self.hi.lengths, keep_hi, k_hi.shape[2]), float("-inf"))
        l_lo = self.key_codec.scores(qg, enc_k) * scale
        if not everything(self.lo.lengths, keep_lo, l_lo.shape[-1]):
            l_lo = l_lo.masked_fill(hidden(self.lo.lengths, keep_lo, l_lo.shape[-1]), float("-inf"))
        out, p_hi, p_lo = merge_two_segments(
            l_hi,
            v_hi,
            l_lo,
            lambda p: self.value_codec.weighted(p, enc_v),
            need_probs,
            all_visible_hi=full_hi,
        )
        out = out.reshape(b, h, d).to(q.dtype)
        if p_hi is None or p_lo is None:
            return out, None, None
        return out, p_hi.reshape(b, h, -1), p_lo.reshape(b, h, -1)
