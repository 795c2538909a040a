"""H2O under MPC: secret accumulated scores, secret heavy hitters, oblivious decode-time eviction.

:class:`~mpckv.plaintext.methods.h2o.H2O` delegates its hooks here when the backend is secure. The sizes
``k`` (kept entries) and ``k_r`` (recent entries) come from :meth:`H2O.split` (public functions of the
prompt length and budget), so the secure cache keeps exactly as many entries as the plaintext one.

Public: the prompt length, ``k``, ``k_r``, the cache length at every step (``k`` once full), and that
the last ``k_r`` entries are always kept. Secret: K, V, every probability and accumulated score, and
*which* older entries survive (their positions too: :data:`SECRET_POSITION` in the public metadata).

* **Prefill** (``comm.op("static_eviction")``): the accumulated score of every prompt key is the column
  sum of the causal softmax of all prompt queries (secret, summed over the GQA group — the plaintext
  ``"sum"``; ``"mean"`` ranks the same), the secure top-k keeps ``k − k_r`` of the older entries (ties to
  the lower index), and the cache and the scores are compacted by one secret one-hot product.
* **Decode** (``comm.op("method")``): the secret attention probabilities over the cache are added to the
  scores (local); once the cache holds ``k + 1`` entries the lowest-scoring older entry is found by a
  comparison tree over distinct keys ``score·2**b + (N−1−i)`` (a tie evicts the higher index, i.e. keeps
  the lower one, like :func:`~mpckv.plaintext.methods.topk.select_topk`), its one-hot by equality tests
  against the minimum, and the entries after it move down by one: ``row'_j = row_j + c_j·(row_{j+1} −
  row_j)`` with ``c_j = [j ≥ evicted]`` the prefix sum of the one-hot (local), one product per element
  of the ``n − k_r`` older rows (``K``, ``V`` and the scores). This costs ``O(n·d)`` per step and layer;
  a persistent-mask cache is re-masked (its rows opened once more under fresh masks) after each eviction.

Limits: batch size 1, one split for every KV head, ``normalize=False`` only, no sliding-window models.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.mpcache_static_secure import (
    SECRET_POSITION,
    StaticChoice,
    _replace_rows,
    apply_static,
    window_mass,
)
from mpckv.protocols.primitives import _add_public, _from_share, eq_zero, secure_topk, tree_max

if TYPE_CHECKING:
    from mpckv.plaintext.methods.h2o import H2O

__all__ = ["after_attention", "evict_one", "on_prefill"]

_SCORES = "h2o_secure_scores"


def _precision() -> int:
    return int(import_crypten().cfg.encoder.precision_bits)


def _uniform(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise ConfigError(f"h2o under MPC needs the same {what} in every KV head, got {sorted(set(values))}")
    return values[0]


def _check(method: H2O, ctx: PrefillContext | DecodeContext) -> None:
    if ctx.config.sliding_window is not None:
        raise ConfigError("h2o under MPC: sliding-window models are not supported")
    if ctx.cache.batch != 1:
        raise ConfigError("h2o under MPC serves one prompt at a time (batch size 1)")
    if method.normalize:
        raise ConfigError("h2o under MPC supports normalize=False only (the official raw sums)")


def on_prefill(method: H2O, ctx: PrefillContext) -> None:
    """Secret prompt scores, secret heavy hitters, oblivious compaction to ``k`` entries."""
    _check(method, ctx)
    cache = ctx.cache
    n = int(ctx.prompt_lengths[0])
    splits = [method.split(n, ctx.layer, h) for h in range(cache.kv_heads)]
    k = _uniform([s[0] for s in splits], "kept count")
    recent = _uniform([s[1] for s in splits], "recent count")
    hk = cache.kv_heads
    ctx.state["k"] = torch.full((1, hk), k, dtype=torch.long)
    ctx.state["recent"] = torch.full((1, hk), recent, dtype=torch.long)
    if ctx.q is None:
        raise ConfigError("h2o under MPC needs the secret prompt queries (a secure prefill)")
    with comm.op("static_eviction"):
        scores = window_mass(ctx.q, cache, n, n, ctx.scale).sum(2)  # [1, Hk, n]
        if n > k:
            hi, k_mid = n - recent, k - recent
            choice = StaticChoice(n0=n, lo=0, hi=hi, k_mid=k_mid)
            if k_mid > 0:
                choice.onehot = secure_topk(scores[..., :hi], k_mid)  # [1, Hk, k_mid, hi]
                kept = choice.onehot.matmul(scores[..., :hi].unsqueeze(-1)).squeeze(-1)
                scores = import_crypten().cat([kept, scores[..., hi:]], dim=-1)
                apply_static(cache, choice)
            else:
                scores = scores[..., hi:]
                cache.compact(torch.arange(hi, n).expand(1, hk, n - hi).contiguous())
    ctx.state[_SCORES] = scores


def evict_one(cache: Any, scores: Any, recent: int) -> Any:
    """Remove the lowest-scoring entry outside the last ``recent`` (ties: the higher index goes).

    Returns the shifted scores ``[1, Hk, n − 1]``; the cache is rewritten with ``n − 1`` rows.
    """
    crypten = import_crypten()
    n = cache.max_length
    m = n - recent  # older entries, candidates for eviction
    b = max(1, math.ceil(math.log2(m)))
    offsets = torch.arange((1 << b) - 1, (1 << b) - 1 - m, -1, dtype=torch.long).expand(*scores.shape[:-1], m)
    cand = scores[..., :m]
    keys = _from_share(_add_public(cand.share * (1 << b), offsets), 0)  # distinct, scale 1
    lowest = -tree_max(-keys, dim=-1, keepdim=True)
    onehot = eq_zero(keys - lowest)  # [1, Hk, m] bits: the evicted entry
    shift = onehot.clone()
    shift.share = onehot.share.cumsum(-1)  # c_j = [j >= evicted] (local)
    c = shift[..., : m - 1]
    hk, d = cache.kv_heads, cache.head_dim
    keys_c, values_c = cache.keys(), cache.values()
    both = crypten.cat([keys_c, values_c, scores.unsqueeze(-1).expand(1, hk, n, 1)], dim=-1)  # [1,Hk,n,2d+1]
    # older rows 0 … m − 2 take their successor where c = 1; rows m − 1 … n − 2 take their successor
    head, nxt = both[:, :, : m - 1], both[:, :, 1:m]
    moved = head + c.unsqueeze(-1) * (nxt - head) if m > 1 else head
    rows = crypten.cat([moved, both[:, :, m:]], dim=2) if m > 1 else both[:, :, m:]
    new_k, new_v, new_s = rows[..., :d], rows[..., d : 2 * d], rows[..., 2 * d]
    pos_old = cache.positions()[0, 0]
    pos = torch.cat([torch.full((m - 1,), SECRET_POSITION, dtype=torch.long), pos_old[m:]])[None]
    _replace_rows(cache, new_k, new_v, pos)
    return new_s


def after_attention(method: H2O, ctx: DecodeContext, probs: Any) -> None:
    """Accumulate the secret probabilities; evict one entry obliviously once the cache exceeds ``k``."""
    if probs is None:
        raise ConfigError("h2o needs the decode attention probabilities (needs_decode_probs)")
    _check(method, ctx)
    crypten = import_crypten()
    cache = ctx.cache
    hk = cache.kv_heads
    n = cache.max_length
    with comm.op("method"):
        p = probs.reshape(1, hk, probs.shape[1] // hk, n).sum(2)  # [1, Hk, n]
        prev = ctx.state[_SCORES]
        if prev.shape[-1] < n:  # the appended entry starts at 0
            zero = _from_share(torch.zeros(1, hk, n - prev.shape[-1], dtype=torch.long), _precision())
            prev = crypten.cat([prev, zero], dim=-1)
        scores = prev + p
        k, recent = int(ctx.state["k"][0, 0]), int(ctx.state["recent"][0, 0])
        if n > k:
            if n != k + 1:
                raise ConfigError(
                    f"h2o under MPC evicts one entry per step; cache holds {n} > k + 1 = {k + 1}"
                )
            scores = evict_one(cache, scores, recent)
    ctx.state[_SCORES] = scores
