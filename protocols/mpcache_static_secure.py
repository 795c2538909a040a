"""MPCache's static eviction under MPC: the look-once kept set of the prompt, with secret middle picks.

Part of the secure twin of :class:`~mpckv.plaintext.methods.mpcache.MPCache` (the decode-time cluster
selection is :mod:`mpckv.protocols.mpcache_secure`, which also documents what is public overall). Sizes
come from the plaintext helpers (:func:`~mpckv.plaintext.methods.clusters.static_keep_counts`), so the
secure run keeps exactly as many prompt tokens per layer as the plaintext one.

**Static eviction** (prefill, once per layer, :func:`static_choice` + :func:`apply_static`). The window
attention mass ``Σ_w softmax(q_w·Kᵀ/√d)`` (causal, :func:`mpckv.protocols.numerics.softmax`) is
computed on secret shares; the sinks ``[0, a)`` and the window ``[b, n0)`` are kept by the public rule,
and :func:`~mpckv.protocols.primitives.secure_topk` picks ``k_mid = kept − a − W`` of the middle tokens
``[a, b)`` (ties → lower index, like the plaintext). The kept set is then

* **oblivious (default)**: compacted by a secret one-hot product ``onehot [k_mid, b − a] · K[a:b]``
  (and V) — ``O(k_mid·(b − a)·d)`` once per layer. The result is the kept rows in ascending original
  order at public length ``kept``; the *positions* of the middle rows are secret, so the cache's public
  position metadata holds ``-1`` there (RoPE was applied before caching, attention needs no position;
  sliding-window models are therefore refused). A persistent-mask cache
  (:mod:`mpckv.protocols.persistent_cache`) is rebuilt: the gathered rows are appended to a fresh
  cache, i.e. opened once more under fresh masks.
* **leaky** (``MPCache(leaky=True)``): **the kept index set of every layer is revealed to all
  parties** (one ``get_plain_text`` of ``b − a`` bits per layer) and the cache is compacted by public
  index, for free. This discloses which prompt tokens the model attends to from its last ``W`` queries
  — an attention pattern of the private prompt, and through it information about the prompt and the
  weights. Use it only for measurement or when that pattern is not sensitive.

Traffic label: ``comm.op("static_eviction")`` (window scores, top-k, compaction or reveal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
from mpckv.plaintext.methods.clusters import static_keep_counts, static_window_sizes
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.primitives import _from_share, secure_topk, tree_max

if TYPE_CHECKING:
    from mpckv.plaintext.methods.mpcache import MPCache

__all__ = [
    "SECRET_POSITION",
    "StaticChoice",
    "apply_static",
    "check_context",
    "is_persistent",
    "static_choice",
    "static_evict",
    "static_window_scores",
    "window_mass",
]

SECRET_POSITION = -1
"""Public position metadata of a kept middle prompt token after oblivious compaction (secret position)."""


def _crypten() -> Any:
    return import_crypten()


def is_persistent(cache: Any) -> bool:
    from mpckv.protocols.persistent_cache import PersistentLayerCache

    return isinstance(cache, PersistentLayerCache)


def check_context(method: MPCache, ctx: PrefillContext | DecodeContext) -> None:
    if ctx.config.sliding_window is not None:
        raise ConfigError("mpcache under MPC: sliding-window models are not supported (positions are secret)")
    if ctx.cache.batch != 1:
        raise ConfigError("mpcache under MPC serves one prompt at a time (batch size 1)")


@dataclass
class StaticChoice:
    """The static kept set of one layer: public forced ranges plus the secret (or revealed) middle picks.

    The prompt ``[0, n0)`` is kept as ``[0, lo)`` (sinks) + ``k_mid`` picks of ``[lo, hi)`` + ``[hi, n0)``
    (window). ``onehot [1, Hs, k_mid, hi − lo]`` (secret scale-1 bits, ``Hs`` = 1 in ``"layer"`` mode or
    ``Hk``) is set in oblivious mode; ``index [1, Hk, kept]`` (public) when the set is public (leaky mode,
    or nothing to choose).
    """

    n0: int
    lo: int
    hi: int
    k_mid: int
    onehot: Any = None
    index: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return self.lo + self.k_mid + (self.n0 - self.hi)


def window_mass(q: Any, cache: Any, n0: int, w: int, scale: float) -> Any:
    """Secret ``Σ_w softmax(q_w·Kᵀ·scale)`` per query head: ``[1, Hk, G, n0]`` over the last ``w`` prompt
    queries (causal) and the ``n0`` prompt keys of ``cache`` (the observation-window votes of SnapKV,
    PyramidKV and MPCache's static eviction). ``q [1, H, T, d]`` secret."""
    from mpckv.protocols.numerics import softmax

    _, h, _, d = q.shape
    hk = cache.kv_heads
    g = h // hk
    q_win = q[:, :, n0 - w : n0].reshape(1, hk, g, w, d)
    if is_persistent(cache):
        scores = cache.qk(q_win)  # O(w·d) opened: K stays under its persistent mask
    else:
        k = cache.keys()
        scores = q_win.reshape(1, hk, g * w, d).matmul(k.transpose(-1, -2)).reshape(1, hk, g, w, n0)
    col = torch.arange(n0)
    keep = col[None, :] <= (n0 - w + torch.arange(w))[:, None]  # [w, n0] causal
    probs = softmax(scores * scale, dim=-1, keep=keep[None, None, None])
    return probs.sum(-2)  # [1, Hk, G, n0]


def static_window_scores(method: MPCache, q: Any, cache: Any, n0: int, w: int, scale: float) -> Any:
    """Secret window attention mass per prompt key: ``[1, 1, n0]`` (``"layer"`` mode) or ``[1, Hk, n0]``.

    ``Σ_w softmax(q_w·Kᵀ·scale)`` over the last ``w`` prompt queries (causal), summed over the query
    heads (``"layer"``: all heads; ``"head"``: the GQA group with ``group_reduce`` — ``"mean"`` as a
    sum, the same ranking). The plaintext twin is :func:`mpckv.plaintext.methods.clusters.static_scores`
    (which averages: it equals this divided by the number of heads summed).
    """
    mass = window_mass(q, cache, n0, w, scale)  # [1, Hk, G, n0]
    g = mass.size(2)
    if method.static_mode == "layer":
        return mass.sum(2).sum(1, keepdim=True)
    if method.group_reduce == "max" and g > 1:
        return tree_max(mass, dim=2)
    return mass.sum(2)


def static_choice(method: MPCache, ctx: PrefillContext) -> StaticChoice | None:
    """Choose the layer's kept prompt set (secret middle picks); ``None`` when nothing is evicted.

    Sizes follow the plaintext rule (:func:`static_keep_counts`). In leaky mode the picks are revealed
    here (to every party) and returned as a public index.
    """
    cache = ctx.cache
    n0_t = ctx.prompt_lengths.long()
    windows = static_window_sizes(n0_t, method.window_frac)
    keep = static_keep_counts(n0_t, method.static_ratio, method.sinks, windows)
    if bool((n0_t <= keep).all()):
        return None
    if cache.version != 0:
        raise ConfigError("mpcache static eviction needs the uncompacted prompt cache; put it first")
    n0, w, kept = int(n0_t[0]), int(windows[0]), int(keep[0])
    if cache.max_length != n0:
        raise ConfigError(f"mpcache: the prompt cache holds {cache.max_length} rows, expected {n0}")
    hi = n0 - w
    lo = min(method.sinks, hi)
    k_mid = kept - lo - w
    choice = StaticChoice(n0=n0, lo=lo, hi=hi, k_mid=k_mid)
    if k_mid <= 0:  # only the public sinks and window survive
        choice.k_mid = 0
        choice.index = _static_index(choice, None, cache.kv_heads)
        return choice
    with comm.op("static_eviction"):
        mass = static_window_scores(method, ctx.q, cache, n0, w, ctx.scale)
        onehot = secure_topk(mass[..., lo:hi], k_mid)  # [1, Hs, k_mid, hi − lo]
        if method.leaky:
            # LEAK (documented): every party learns the kept middle tokens of this layer.
            picked = onehot.sum(-2).get_plain_text().round().long().bool()  # [1, Hs, hi − lo]
            choice.index = _static_index(choice, picked, cache.kv_heads)
        else:
            choice.onehot = onehot
    return choice


def _static_index(choice: StaticChoice, picked: torch.Tensor | None, hk: int) -> torch.Tensor:
    """Public kept index ``[1, Hk, kept]`` from revealed middle bits ``[1, Hs, hi − lo]`` (or none)."""
    rows = []
    heads = 1 if picked is None else picked.shape[1]
    for head in range(heads):
        mid = torch.arange(choice.lo, choice.hi)[picked[0, head]] if picked is not None else torch.arange(0)
        rows.append(torch.cat([torch.arange(choice.lo), mid, torch.arange(choice.hi, choice.n0)]))
    index = torch.stack(rows)[None]
    return index.expand(1, hk, index.shape[-1]).contiguous() if heads == 1 else index


def apply_static(cache: Any, choice: StaticChoice) -> None:
    """Compact the prompt cache to ``choice`` (public index: local; secret one-hot: oblivious gather)."""
    if choice.index is not None:
        cache.compact(choice.index)
        return
    with comm.op("static_eviction"):
        crypten = _crypten()
        hk, d = cache.kv_heads, cache.head_dim
        lo, hi, n0, k_mid = choice.lo, choice.hi, choice.n0, choice.k_mid
        onehot = choice.onehot
        if onehot.shape[1] != hk:
            onehot = onehot.expand(1, hk, k_mid, hi - lo)
        keys, values = cache.keys(), cache.values()
        if is_persistent(cache):
            pad_lo = torch.zeros(1, hk, k_mid, lo, dtype=torch.long)
            pad_hi = torch.zeros(1, hk, k_mid, n0 - hi, dtype=torch.long)
            full = _from_share(torch.cat([pad_lo, onehot.share, pad_hi], dim=-1), 0)
            mid_k = cache.matmul(full, ("k", "N", 0))  # opens the one-hot [Hk, k_mid, n0], K stays masked
            mid_v = cache.matmul(full, ("v", "N", 0))
        else:
            both = crypten.cat([keys[:, :, lo:hi], values[:, :, lo:hi]], dim=-1)
            mid = onehot.matmul(both)  # one Beaver matmul; exact (scale-1 bits)
            mid_k, mid_v = mid[..., :d], mid[..., d:]
        new_k = crypten.cat([keys[:, :, :lo], mid_k, keys[:, :, hi:n0]], dim=2)
        new_v = crypten.cat([values[:, :, :lo], mid_v, values[:, :, hi:n0]], dim=2)
        pos = torch.cat([torch.arange(lo), torch.full((k_mid,), SECRET_POSITION), torch.arange(hi, n0)])[None]
        _replace_rows(cache, new_k, new_v, pos)


def _replace_rows(cache: Any, k: Any, v: Any, pos: torch.Tensor) -> None:
    """Replace every row of ``cache`` by the secret ``k, v [1, Hk, T, d]`` (public positions ``[1, T]``)."""
    version = cache.version
    if is_persistent(cache):
        from mpckv.protocols.persistent_cache import PersistentLayerCache

        fresh = PersistentLayerCache(cache.batch, cache.kv_heads, cache.head_dim)
        fresh.append(k, v, pos)  # the kept rows are opened once more, under fresh masks
        stamp = cache._stamp
        cache.close()
        cache.__dict__.update(fresh.__dict__)
        cache._stamp = stamp + 1 + fresh._stamp  # invalidates views materialised before
    else:
        cache.k = cache.v = None
        cache.pos = torch.zeros(cache.batch, cache.kv_heads, 0, dtype=torch.long)
        cache.lengths = torch.zeros(cache.batch, cache.kv_heads, dtype=torch.long)
        cache.append(k, v, pos)
    cache.version = version + 1


def static_evict(method: MPCache, ctx: PrefillContext) -> StaticChoice | None:
    """Secure twin of :meth:`MPCache.static_evict`: choose the kept set, compact, return the choice."""
    choice = static_choice(method, ctx)
    if choice is not None:
        apply_static(ctx.cache, choice)
    return choice
