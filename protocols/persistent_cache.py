"""The persistent-mask KV cache: each K/V row is opened once, masked; decode products cost O(d + n).

In stock CrypTen (:class:`~mpckv.protocols.secure_cache.SecureLayerCache`) every decode step's ``q·Kᵀ``
and ``p·V`` re-mask and re-open the whole cache with a fresh Beaver triple: ``O(n·d)`` per head and step
(``shared/research/mpc_anchors.md``, finding 1). Here, when rows ``K_new, V_new`` are appended, the dealer
draws uniformly random ring masks ``B_k, B_v`` (secret-shared, known to the dealer only) and the parties
open ``E_k = K_new − B_k``, ``E_v = V_new − B_v`` **once**. The cache keeps the public ``E`` and each
party's share of ``B``. Every product then takes a fresh dealer triple that reuses ``B``
(:mod:`mpckv.protocols.masked_matmul`):

==================  ================================  ===================================================
operation           opened (online, per party, 2PC)   dealer sends party 0 (offline, TTP)
==================  ================================  ===================================================
``append`` T rows   ``2·Hk·T·d`` ring elements, once  nothing (queued for the next request)
``qk(q)``           ``Hk·G·T·d``  (``q − a_t``)        ``Hk·G·T·L``  (``a_t·Bᵀ``)
``pv(p)``           ``Hk·G·T·L``  (``p − a_t``)        ``Hk·G·T·d``  (``a_t·B_v``)
``gather_onehot``   ``Hk·k·C``    (``e − a_t``)        ``Hk·k·s·d``  (``a_t·B̃``)
``compact``         nothing                           the index, with the next request
==================  ================================  ===================================================

(8 bytes per ring element; the system total is twice this in 2PC; 2PC truncation is local, 3-party
truncation adds CrypTen's wraps/RSS traffic of the output's size.) Why opening ``E`` and the ``ε``'s leaks
nothing: ``docs/SECURITY.md``.

Same interface as :class:`~mpckv.protocols.secure_cache.SecureLayerCache` (public lengths and positions,
``append``, ``compact`` with a public index), plus :meth:`PersistentLayerCache.qk`,
:meth:`PersistentLayerCache.pv` and :meth:`PersistentLayerCache.gather_onehot`. :meth:`keys` /
:meth:`values` materialise a CrypTensor for the stock path without communication (party 0's share is
``E + B_0``, the others' ``B_i``); the returned tensor remembers where it came from, so a backend can route
products to the cheap path (:func:`persistent_source`). Batch size 1 only, like the stock cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.plaintext.kv_cache import KVCache
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.masked_matmul import Spec, layout, mask_source, masked_product, open_masked
from mpckv.protocols.secure_cache import SecureLayerCache

__all__ = ["PersistentKVCache", "PersistentLayerCache", "PersistentRef", "persistent_source"]

_KEYS = itertools.count()  # parties create caches in the same order, so keys agree across parties


@dataclass(frozen=True)
class PersistentRef:
    """Attached to a materialised ``keys()`` / ``values()``: the cache, which side, the cache's stamp."""

    cache: PersistentLayerCache
    which: str
    stamp: int


def persistent_source(x: Any) -> PersistentRef | None:
    """The cache behind ``x`` if ``x`` is an unmodified ``keys()``/``values()`` of a persistent cache
    that has not changed since; ``None`` otherwise (then use the stock path)."""
    ref = getattr(x, "_mpckv_persistent", None)
    if isinstance(ref, PersistentRef) and ref.stamp == ref.cache._stamp:
        return ref
    return None


class PersistentLayerCache(SecureLayerCache):
    """One layer's K/V as public masked rows ``E`` plus secret-shared masks ``B``.

    Public bookkeeping (lengths, positions, sizes) is the stock secure cache's; storage and products differ.
    """

    pos: torch.Tensor
    lengths: torch.Tensor

    def __init__(self, batch: int, kv_heads: int, head_dim: int):
        super().__init__(batch, kv_heads, head_dim)
        self.key = next(_KEYS)
        self.masks = mask_source(self.key)
        self.rank = int(import_crypten().communicator.get().get_rank())
        self.ek: torch.Tensor | None = None  # public K − B_k   [1, Hk, L, d] ring elements
        self.ev: torch.Tensor | None = None  # public V − B_v
        self.bk: torch.Tensor | None = None  # this party's share of B_k
        self.bv: torch.Tensor | None = None  # this party's share of B_v
        self.scale: int | None = None
        self._stamp = 0  # bumped by every append / compact (invalidates materialised views)

    # ------------------------------------------------------------------ sizes (public)
    def live_bytes(self) -> int:
        """This party's storage: public ``E_k, E_v`` plus its shares of ``B_k, B_v`` (int64)."""
        return sum(8 * t.numel() for t in (self.ek, self.ev, self.bk, self.bv) if t is not None)

    def nbytes(self) -> int:
        return self.live_bytes() + self.pos.numel() * 8

    # ------------------------------------------------------------------ updates
    def append(
        self, k_new: Any, v_new: Any, pos_new: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        """Append ``T`` secret rows ``[1, Hk, T, d]``: open ``K_new − B_k`` and ``V_new − B_v`` once."""
        b, hk, t, d = k_new.shape
        if (b, hk, d) != (self.batch, self.kv_heads, self.head_dim) or tuple(v_new.shape) != (b, hk, t, d):
            raise ShapeError(
                f"append expects K, V [1, {self.kv_heads}, T, {self.head_dim}], got "
                f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        if counts is not None and bool((counts != t).any()):
            raise ShapeError("secure prefill takes one unpadded prompt")
        scale = int(k_new.encoder.scale)
        if int(v_new.encoder.scale) != scale or (self.scale is not None and scale != self.scale):
            raise ConfigError("K and V must share one fixed-point scale")
        self.scale = scale
        with comm.op("kv_append"):
            bk, bv = self.masks.rows((b, hk, t, d))
            ek, ev = open_masked([k_new.share - bk, v_new.share - bv], ["k_rows", "v_rows"])
        self.ek = ek if self.ek is None else torch.cat([self.ek, ek], dim=2)
        self.ev = ev if self.ev is None else torch.cat([self.ev, ev], dim=2)
        self.bk = bk if self.bk is None else torch.cat([self.bk, bk], dim=2)
        self.bv = bv if self.bv is None else torch.cat([self.bv, bv], dim=2)
        self.pos = torch.cat([self.pos, pos_new.long()[:, None, :].expand(b, hk, t)], dim=2)
        self.lengths = self.lengths + t
        self._stamp += 1

    def append_keys(self, k_new: Any, pos_new: torch.Tensor) -> None:
        """Append ``T`` secret rows ``[1, Hk, T, d]`` to the *key* side only (one opening of
        ``K_new − B_k``); the value side stays empty, so only :meth:`qk` works afterwards.

        For static matrices that are only ever multiplied from one side (a weight ``W`` in ``x·Wᵀ``,
        :mod:`mpckv.protocols.persistent_weights`): half the set-up traffic and storage of
        :meth:`append`. The mask source still draws (and, under TFP, at once drops) a value-side mask, so
        the dealer's generators stay in step with every party's.
        """
        b, hk, t, d = k_new.shape
        if (b, hk, d) != (self.batch, self.kv_heads, self.head_dim):
            raise ShapeError(
                f"append_keys expects [1, {self.kv_heads}, T, {self.head_dim}], got {tuple(k_new.shape)}"
            )
        if self.ev is not None:
            raise ConfigError("append_keys on a cache whose value side is in use")
        scale = int(k_new.encoder.scale)
        if self.scale is not None and scale != self.scale:
            raise ConfigError("all rows must share one fixed-point scale")
        self.scale = scale
        with comm.op("kv_append"):
            bk, _ = self.masks.rows((b, hk, t, d))
            store = getattr(self.masks, "store", None)
            if store is not None:
                store.bv = None  # TFP dealer (party 0): the value-side mask is never used
            (ek,) = open_masked([k_new.share - bk], ["k_rows"])
        self.ek = ek if self.ek is None else torch.cat([self.ek, ek], dim=2)
        self.bk = bk if self.bk is None else torch.cat([self.bk, bk], dim=2)
        self.pos = torch.cat([self.pos, pos_new.long()[:, None, :].expand(b, hk, t)], dim=2)
        self.lengths = self.lengths + t
        self._stamp += 1

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep the rows at the public ``index [1, Hk, K]``: local slicing of E and B shares."""
        index = self.public_index(index, valid)
        if self.ek is None or self.ev is None or self.bk is None or self.bv is None:
            raise ShapeError("compaction of an empty cache")
        b, hk, kk = index.shape
        gidx = index[..., None].expand(b, hk, kk, self.head_dim)
        self.ek, self.ev = self.ek.gather(2, gidx), self.ev.gather(2, gidx)
        self.bk, self.bv = self.bk.gather(2, gidx), self.bv.gather(2, gidx)
        self.masks.compact(index)
        self.pos = torch.gather(self.pos, 2, index)
        self.lengths = torch.full((b, hk), kk, dtype=torch.long)
        self.version += 1
        self._stamp += 1

    def close(self) -> None:
        """Let the dealer forget this cache's masks (TTP: one small offline request from party 0)."""
        self.masks.close()

    # ------------------------------------------------------------------ products (O(d + n) online)
    def _operand(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        e, b = (self.ek, self.bk) if which == "k" else (self.ev, self.bv)
        if e is None or b is None:
            raise ShapeError("product with an empty cache")
        return e, b

    def matmul(self, x: Any, spec: Spec) -> Any:
        """``x [1, Hk, R, X] · f(M)`` for the cache side and layout in ``spec`` (see masked_matmul)."""
        e, b = self._operand(spec[0])
        if x.dim() != 4 or tuple(x.shape[:2]) != (self.batch, self.kv_heads):
            raise ShapeError(f"expected an operand [1, {self.kv_heads}, R, X], got {tuple(x.shape)}")
        assert self.scale is not None
        return masked_product(
            x, layout(e, spec), layout(b, spec), spec, self.masks, tuple(e.shape), self.scale
        )

    def qk(self, q: Any) -> Any:
        """Secret scores ``q · Kᵀ``: ``q [1, Hk, *mid, d]`` (e.g. ``[1, Hk, G, T, d]``) → ``[.., L]``."""
        if tuple(q.shape[:2]) != (self.batch, self.kv_heads) or q.shape[-1] != self.head_dim:
            raise ShapeError(f"qk expects q [1, {self.kv_heads}, ..., {self.head_dim}], got {tuple(q.shape)}")
        mid = tuple(q.shape[2:-1])
        out = self.matmul(q.reshape(self.batch, self.kv_heads, -1, self.head_dim), ("k", "T", 0))
        return out.reshape(self.batch, self.kv_heads, *mid, self.max_length)

    def pv(self, p: Any) -> Any:
        """Secret ``p · V``: ``p [1, Hk, *mid, L]`` → ``[1, Hk, *mid, d]``."""
        if tuple(p.shape[:2]) != (self.batch, self.kv_heads) or p.shape[-1] != self.max_length:
            raise ShapeError(
                f"pv expects p [1, {self.kv_heads}, ..., {self.max_length}], got {tuple(p.shape)}"
            )
        mid = tuple(p.shape[2:-1])
        out = self.matmul(p.reshape(self.batch, self.kv_heads, -1, self.max_length), ("v", "N", 0))
        return out.reshape(self.batch, self.kv_heads, *mid, self.head_dim)

    def gather_onehot(self, onehot: Any, cluster_size: int, which: str = "keys") -> Any:
        """MPCache's cluster gather ``e · K̃``: secret one-hot ``[1, Hk, *mid, k, C]`` over the
        ``C = ⌈L/s⌉`` clusters of ``s = cluster_size`` consecutive rows → ``[1, Hk, *mid, k·s, d]``.

        A partial last cluster is padded with zero rows (public: the pad positions are known).
        """
        if which not in ("keys", "values"):
            raise ConfigError(f"which must be 'keys' or 'values', got {which!r}")
        if cluster_size < 1:
            raise ConfigError("cluster_size must be >= 1")
        c = -(-self.max_length // cluster_size)
        if (
            onehot.dim() < 4
            or tuple(onehot.shape[:2]) != (self.batch, self.kv_heads)
            or onehot.shape[-1] != c
        ):
            raise ShapeError(
                f"gather_onehot expects [1, {self.kv_heads}, ..., k, {c}] for s={cluster_size}, "
                f"got {tuple(onehot.shape)}"
            )
        lead = tuple(onehot.shape[2:-1])
        spec: Spec = ("k" if which == "keys" else "v", "C", int(cluster_size))
        out = self.matmul(onehot.reshape(self.batch, self.kv_heads, -1, c), spec)
        return out.reshape(self.batch, self.kv_heads, *lead[:-1], lead[-1] * cluster_size, self.head_dim)

    # ------------------------------------------------------------------ materialised views (no traffic)
    def _materialise(self, which: str) -> Any:
        if self.ek is None:
            return None
        crypten = import_crypten()
        e, b = self._operand(which)
        share = b + e if self.rank == 0 else b.clone()
        assert self.scale is not None
        out = crypten.mpc.MPCTensor.from_shares(share, precision=int(self.scale).bit_length() - 1)
        out._mpckv_persistent = PersistentRef(self, which, self._stamp)
        return out

    def keys(self) -> Any:
        """The secret K as a CrypTensor (local: party 0's share is ``E_k + B_k,0``); for the stock path."""
        return self._materialise("k")

    def values(self) -> Any:
        """The secret V as a CrypTensor (local); for the stock path."""
        return self._materialise("v")


class PersistentKVCache(KVCache):
    """All layers' persistent-mask caches."""

    def new_layer(self, batch: int, kv_heads: int, head_dim: int, *args: Any) -> PersistentLayerCache:
        return PersistentLayerCache(batch, kv_heads, head_dim)

    def close(self) -> None:
        for c in self.layers:
            c.close()
