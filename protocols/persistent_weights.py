"""Weights with persistent masks: each weight matrix is opened once as ``W − B`` and every product with it
costs one opening of the *activation* (``O(d_in)`` per token) instead of CrypTen's re-masking of the whole
matrix (``O(d_in · d_out)`` per token).

The weights are the other large static secret of private inference (with the KV cache). We reuse the
persistent-mask machinery of :mod:`mpckv.protocols.persistent_cache`: a matrix ``W [out, in]`` is stored
as a one-head "cache" whose rows are the ``out`` rows of ``W``, so ``x · Wᵀ`` is the cache's ``q·Kᵀ``
product and an embedding lookup ``onehot · T`` (table ``T [V, D]``) its ``p·V`` product; a tied embedding
table serves both. What is opened (``W − B`` once at set-up, ``x − a_t`` per product) and why it leaks
nothing is in ``docs/SECURITY.md``; the weights' owner (party 0) secret-shares ``W`` first, so the opening
is of a secret-shared value like any other.

Set-up cost: one opening of every weight, reported under the ``setup`` phase. A projection matrix is only
multiplied from one side (``x·Wᵀ``), so it keeps the key side alone (:meth:`PersistentLayerCache
.append_keys`: one ``[out, in]`` opening, and ``E`` plus this party's share of ``B`` stored, 16 bytes per
weight); an embedding table (``two_sided=True``; a tied one also serves as the lm head) keeps both sides.
"""

from __future__ import annotations

from typing import Any

import torch

from mpckv.errors import ShapeError
from mpckv.protocols import comm
from mpckv.protocols.persistent_cache import PersistentLayerCache


class PersistentWeight:
    """A secret matrix ``W [out, in]`` (or an embedding table ``[V, D]``) with a persistent mask."""

    def __init__(self, weight: Any, two_sided: bool = True):
        if weight.dim() != 2:
            raise ShapeError(f"a persistent weight must be 2-D, got {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.two_sided = two_sided
        self.cache = PersistentLayerCache(1, 1, self.in_features)
        with comm.labels(phase="setup", op="weight_masks"):
            w = weight.reshape(1, 1, self.out_features, self.in_features)
            rows = torch.arange(self.out_features)[None]
            if two_sided:
                self.cache.append(w, w, rows)
            else:
                self.cache.append_keys(w, rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def linear(self, x: Any) -> Any:
        """``x [..., in] · Wᵀ → [..., out]`` (one opening of ``x``)."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"linear expects [..., {self.in_features}], got {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        out = self.cache.qk(x.reshape(1, 1, -1, self.in_features))
        return out.reshape(*lead, self.out_features)

    def lookup(self, onehot: Any) -> Any:
        """``onehot [..., out] · W → [..., in]`` (an embedding lookup; one opening of the one-hot)."""
        if not self.two_sided:
            raise ShapeError("lookup needs a two-sided persistent weight (an embedding table)")
        if onehot.shape[-1] != self.out_features:
            raise ShapeError(f"lookup expects [..., {self.out_features}], got {tuple(onehot.shape)}")
        lead = tuple(onehot.shape[:-1])
        out = self.cache.pv(onehot.reshape(1, 1, -1, self.out_features))
        return out.reshape(*lead, self.in_features)


def is_persistent(w: Any) -> bool:
    return isinstance(w, PersistentWeight)
