"""MPCache under MPC: the same :class:`~mpckv.plaintext.methods.mpcache.MPCache` object, secret indices.

:class:`~mpckv.plaintext.methods.mpcache.MPCache` delegates its hooks here when the backend is secure
(``ctx.xp.secure``); the plaintext method is unchanged and every public size (kept counts, clusters per
level, budgets) comes from the same helpers (:mod:`mpckv.plaintext.methods.clusters`,
:meth:`MPCache.level_sizes`), so the secure run reads exactly as many entries as the plaintext one.

What is public, what is secret
------------------------------
Public: the prompt length ``n0``, the window ``W``, the kept count, the number of clusters and the number
picked at every level, the forced entries (sinks, observation window, first and last cluster), and the
cache length at every step. Secret: K, V, every score, and *which* middle prompt tokens survive static
eviction and *which* middle clusters each decode step reads.

1. **Static eviction** (prefill, once per layer): see :mod:`mpckv.protocols.mpcache_static_secure`
   (oblivious compaction by default, or ``leaky=True``, which reveals the kept set).

2. **Cluster boxes** (:func:`tracked_boxes`): per level, channel-wise min/max of the keys of every
   cluster of the (compacted) cache, by :func:`~mpckv.protocols.primitives.block_minmax` at the first
   decode step of a layer, then updated incrementally: an appended key either opens a new cluster (free)
   or widens the last box (one batched comparison of ``2·d`` elements per level). The proxy vector
   ``r = α·max + (1 − α)·min`` is kept alongside.

3. **Hierarchical selection** (:func:`select_clusters`). Level ``l`` scores every cluster with
   ``q·rᵀ`` (one secret matmul; the GQA group reduction ``"mean"`` is computed as a *sum* — the same
   ranking, no truncation — and ``"max"`` by a comparison tree). Cluster 0 and the last (current) cluster
   are forced at every level and never enter the top-k: :func:`secure_topk` picks the remaining
   ``k_l − 2`` among the middle clusters ``1 … C_l − 2``. Below the first level only the children of the
   previous picks are candidates, and the top-k runs over those alone (:func:`_child_candidates`): the
   children's scores of the ``k'`` secret previous picks are gathered by the previous one-hot (one
   secret product ``[k', C' − 2]·[C' − 2, r]``), the public children of the forced first and last
   clusters are sliced, the top-k picks among these ``≈ r·k'`` candidates (in ascending cluster order,
   so ties still go to the lower cluster), and one more secret product maps its one-hot back to the
   middle clusters. This is what makes the hierarchy pay under MPC: the level-2 sorting network has
   ``≈ r·k'`` inputs instead of ``C_l − 2`` (half, with the default ratio 0.5). When the previous picks
   are public (all candidates taken), non-candidates get an additive penalty ``−2**20`` on the shares
   instead (local).

4. **Gather** (:func:`gather_clusters`, the :class:`~mpckv.plaintext.methods.base.Selection`'s
   ``gather``): the forced first and last clusters are sliced publicly; the ``k_mid`` middle clusters are
   gathered by the secret one-hot over the ``C_L`` finest clusters — :meth:`PersistentLayerCache
   .gather_onehot` on a persistent-mask cache (``Hk·k_mid·C`` opened), ``onehot · [K̃ | Ṽ]`` (one Beaver
   matmul, which also re-opens K and V) on the stock cache. The rows come out in ascending token order,
   all real (middle clusters are full; only the last one can be partial and it is sliced), so the public
   length is the row count and no keep mask is needed.

5. **Cross-layer sharing**: a follower layer reuses its leader's :class:`Selection` (the secret one-hot
   inside its ``gather``) and gathers from its own cache: no scores, no top-k, no selection traffic
   (``comm`` op ``"selection"``); with ``share_static=True`` it also reuses the leader's static choice.

Traffic labels: ``comm.op("static_eviction")`` (window scores, top-k, compaction or reveal),
``comm.op("selection")`` (boxes, proxy scores, top-k), ``comm.op("gather")`` (the one-hot gather).

Limits: batch size 1 (like every secure cache); budgets must be equal across KV heads (per-head lists
that differ are refused); no sliding window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import DecodeContext, Selection
from mpckv.plaintext.methods.clusters import num_clusters
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.mpcache_static_secure import (
    SECRET_POSITION,
    StaticChoice,
    apply_static,
    check_context,
    is_persistent,
    static_choice,
    static_evict,
    static_window_scores,
)
from mpckv.protocols.primitives import (
    _add_public,
    _from_share,
    is_secret,
    ltz,
    secure_topk,
    tree_max,
)

if TYPE_CHECKING:
    from mpckv.plaintext.methods.mpcache import MPCache

__all__ = [  # the static-eviction names are re-exported: MPCache reaches them through this module
    "CHILD_PENALTY",
    "SECRET_POSITION",
    "ClusterChoice",
    "LevelChoice",
    "StaticChoice",
    "apply_static",
    "cluster_gather",
    "gather_clusters",
    "proxy_vectors",
    "select",
    "select_clusters",
    "static_choice",
    "static_evict",
    "static_window_scores",
    "tracked_boxes",
]

CHILD_PENALTY = 2.0**20
"""Subtracted (locally, on the shares) from the proxy score of a cluster that is not a child of a pick."""

_BOX_KEY = "mpcache_secure_boxes"
_SHARED_SEL = "mpcache_shared_selection"  # same slot as the plaintext method (followers read it)


def _precision() -> int:
    return int(import_crypten().cfg.encoder.precision_bits)


def proxy_vectors(kmin: Any, kmax: Any, alpha: float) -> Any:
    """``r = α·kmax + (1 − α)·kmin`` (secret), computed as ``kmin + α·(kmax − kmin)``.

    One public-scalar product on the box width, so the error is one truncation plus the encoding error of
    α (CrypTen truncates it to the fixed-point step) times the width, instead of times ``|kmax|`` and
    ``|kmin|``. Exact for α in {0, 1}.
    """
    if alpha == 1.0:
        return kmax
    if alpha == 0.0:
        return kmin
    return kmin + (kmax - kmin) * alpha


def tracked_boxes(
    state: dict[str, Any], cache: Any, sizes: tuple[int, ...], alpha: float
) -> list[tuple[Any, Any, Any]]:
    """Secret ``(min, max, r)`` ``[1, Hk, C_l, d]`` per level, maintained in ``state``.

    Rebuilt with :func:`block_minmax` on the first call, after a compaction or when the cache grew by more
    than one row; otherwise the appended key opens a new cluster (no work) or widens the last box of each
    level (one batched comparison over ``2·d`` elements per level).
    """
    from mpckv.protocols.primitives import block_minmax

    crypten = import_crypten()
    n = cache.max_length
    st = state.get(_BOX_KEY)
    keys = cache.keys()
    if st is None or st["version"] != cache.version or st["n"] + 1 != n:
        boxes = []
        for s in sizes:
            mn, mx = block_minmax(keys, s)
            boxes.append((mn, mx, proxy_vectors(mn, mx, alpha)))
    else:
        k_new = keys[:, :, n - 1 : n]  # [1, Hk, 1, d]
        boxes = list(st["boxes"])
        grow = [lvl for lvl, s in enumerate(sizes) if (n - 1) % s != 0]
        for lvl, s in enumerate(sizes):
            if (n - 1) % s == 0:  # the new key opens a cluster: its box is the key itself
                mn, mx, r = boxes[lvl]
                boxes[lvl] = tuple(crypten.cat([t, k_new], dim=2) for t in (mn, mx, r))
        if grow:
            lo = crypten.stack([boxes[lvl][0][:, :, -1:] for lvl in grow])  # [g, 1, Hk, 1, d]
            hi = crypten.stack([boxes[lvl][1][:, :, -1:] for lvl in grow])
            kk = k_new.unsqueeze(0).expand(*lo.size())
            bounds = crypten.stack([lo, hi])
            out = ltz(crypten.stack([kk - lo, hi - kk]))  # k < min, max < k
            new = bounds + out * (kk.unsqueeze(0).expand(*bounds.size()) - bounds)
            for j, lvl in enumerate(grow):
                mn, mx, r = boxes[lvl]
                nmn, nmx = new[0, j], new[1, j]
                boxes[lvl] = (
                    crypten.cat([mn[:, :, :-1], nmn], dim=2),
                    crypten.cat([mx[:, :, :-1], nmx], dim=2),
                    crypten.cat([r[:, :, :-1], proxy_vectors(nmn, nmx, alpha)], dim=2),
                )
    state[_BOX_KEY] = {"version": cache.version, "n": n, "boxes": boxes}
    return boxes


# ==================================================================================== selection
@dataclass
class LevelChoice:
    """One level's picks: clusters 0 and ``clusters − 1`` (forced) plus ``k_mid`` middle ones.

    ``onehot [1, Hk, k_mid, clusters − 2]`` over the middle clusters (secret scale-1 bits, a public long
    tensor when the picks are public, ``None`` when ``k_mid == 0``); ``bits [1, Hk, clusters]`` the
    selected clusters (secret bits, or a public long tensor).
    """

    size: int
    clusters: int
    k_mid: int
    onehot: Any
    bits: Any

    @property
    def picked(self) -> int:
        return self.k_mid + min(self.clusters, 2)


@dataclass
class ClusterChoice:
    """A decode step's selection: the finest level's choice and the cache length it was made for."""

    levels: list[LevelChoice]
    length: int

    @property
    def final(self) -> LevelChoice:
        return self.levels[-1]

    @property
    def rows(self) -> int:
        """Public number of gathered rows (tokens read)."""
        f = self.final
        s, c, n = f.size, f.clusters, self.length
        return min(s, n) + f.k_mid * s + (n - (c - 1) * s if c >= 2 else 0)


def _public_int(t: torch.Tensor, what: str) -> int:
    vals = t.flatten().unique()
    if vals.numel() != 1:
        raise ConfigError(f"mpcache under MPC needs the same {what} in every KV head, got {vals.tolist()}")
    return int(vals[0])


def _penalise(u: Any, cand: torch.Tensor) -> Any:
    """``u`` where the public 0/1 ``cand`` is 1, ``u − CHILD_PENALTY`` elsewhere — local."""
    p = int(CHILD_PENALTY * 2 ** _precision())
    out = u.clone()
    out.share = _add_public(u.share, (cand.long() - 1) * p)
    return out


def _level_bits(c: int, mid_bits: Any, hk: int) -> Any:
    """Selected clusters ``[1, Hk, c]``: forced 0 and ``c − 1`` plus the middle bits (secret or public)."""
    edge = torch.ones(1, hk, 1, dtype=torch.long)
    if c <= 2:
        return torch.ones(1, hk, c, dtype=torch.long)
    if not is_secret(mid_bits):
        return torch.cat([edge, mid_bits.long(), edge], dim=-1)
    share = torch.cat(
        [
            _add_public(torch.zeros_like(edge), edge),
            mid_bits.share,
            _add_public(torch.zeros_like(edge), edge),
        ],
        dim=-1,
    )
    return _from_share(share, 0)


def _public_mid(cand: torch.Tensor | None, hk: int, c: int) -> torch.Tensor:
    """Public candidate mask of the middle clusters ``[1, Hk, c − 2]`` (``None`` = every cluster)."""
    if cand is None:
        return torch.ones(1, hk, max(c - 2, 0), dtype=torch.long)
    return cand[..., 1 : c - 1].long()


def _public_onehot(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Public one-hot ``[1, Hk, k, n]`` of the set bits of every row of ``bits [1, Hk, n]`` (ascending)."""
    hk, n = bits.shape[1], bits.shape[2]
    out = torch.zeros(1, hk, k, n, dtype=torch.long)
    for h in range(hk):
        idx = bits[0, h].nonzero().flatten()
        out[0, h, torch.arange(idx.numel()), idx] = 1
    return out


def _children(bits: torch.Tensor, branch: int, c_next: int) -> torch.Tensor:
    """Public child mask ``[1, Hk, c_next]`` of publicly selected parents."""
    return bits.repeat_interleave(branch, dim=-1)[..., :c_next]


def _child_candidates(u: Any, prev: LevelChoice, branch: int, c: int) -> tuple[Any, Any]:
    """This level's middle candidates, compacted: their scores and the map back to the middle clusters.

    Candidates, in ascending cluster order: the middle children of cluster 0 (public: ``1 … r − 1``),
    the ``r`` children of each of the previous level's ``k'`` secret middle picks (their scores gathered
    by the previous one-hot: one secret product ``[k', C' − 2] · [C' − 2, r]``), and the middle children
    of the previous last cluster (public: ``(C' − 1)·r … c − 2``). Returns ``scores [1, Hk, m]`` (secret)
    and ``to_mid [1, Hk, m, c − 2]`` (secret scale-1 bits: row ``i`` is the one-hot of candidate ``i``'s
    middle cluster), built from the shares locally.
    """
    crypten = import_crypten()
    hk = u.size(1)
    onehot = prev.onehot  # [1, Hk, k', C' − 2], secret bits
    kp, n_prev_mid = int(onehot.size(2)), int(onehot.size(3))
    hi0 = (prev.clusters - 1) * branch  # first child of the previous last cluster
    child_u = u[..., branch:hi0].reshape(1, hk, n_prev_mid, branch)
    secret_scores = onehot.matmul(child_u).reshape(1, hk, kp * branch)
    parts = [x for x in (u[..., 1:branch], secret_scores, u[..., hi0 : c - 1]) if x.size(-1) > 0]
    scores = parts[0] if len(parts) == 1 else crypten.cat(parts, dim=-1)

    n_mid = c - 2
    low = torch.zeros(1, hk, branch - 1, n_mid, dtype=torch.long)
    low[..., torch.arange(branch - 1), torch.arange(branch - 1)] = 1  # cluster j → middle column j − 1
    n_high = max(c - 1 - hi0, 0)
    high = torch.zeros(1, hk, n_high, n_mid, dtype=torch.long)
    high[..., torch.arange(n_high), torch.arange(hi0 - 1, hi0 - 1 + n_high)] = 1
    placed = torch.zeros(1, hk, kp, branch, n_mid, dtype=torch.long)
    parents = torch.arange(1, n_prev_mid + 1)  # previous middle column p' is cluster p' + 1
    for j in range(branch):
        placed[:, :, :, j, parents * branch + j - 1] = onehot.share
    share = torch.cat(
        [
            _add_public(torch.zeros_like(low), low),
            placed.reshape(1, hk, kp * branch, n_mid),
            _add_public(torch.zeros_like(high), high),
        ],
        dim=2,
    )
    return scores, _from_share(share, 0)


def select_clusters(method: MPCache, ctx: DecodeContext) -> ClusterChoice | None:
    """Secure twin of :meth:`MPCache.select_clusters`: the secret picks per level, or ``None`` (dense)."""
    cache = ctx.cache
    lengths = cache.lengths
    sizes = method.cluster_sizes
    ks = method.level_sizes(lengths, ctx.layer, seen=torch.as_tensor(ctx.positions) + 1)
    n_valid = [num_clusters(lengths, s) for s in sizes]
    if bool((ks[-1] >= n_valid[-1]).all()):
        return None
    n = cache.max_length
    hk = cache.kv_heads
    with comm.op("selection"):
        boxes = tracked_boxes(ctx.state, cache, sizes, method.alpha)
        q = ctx.q
        g = q.shape[1] // hk
        qg = q.reshape(1, hk, g, q.shape[-1])
        levels: list[LevelChoice] = []
        cand: torch.Tensor | None = None  # public candidate mask of this level (None: every cluster)
        secret_parents = False  # the previous level picked secretly: candidates are its picks' children
        n_cand = 0
        for lvl, s in enumerate(sizes):
            c = _public_int(n_valid[lvl], "cluster count")
            k = _public_int(ks[lvl], "budget")
            if lvl == 0:
                n_cand = c
            else:
                prev = levels[-1]
                branch = sizes[lvl - 1] // s
                c_last = c - (prev.clusters - 1) * branch
                n_cand = (prev.picked - 1) * branch + c_last
            nf = min(c, 2)
            kk = min(max(k, nf), n_cand)
            k_mid, n_mid = kk - nf, c - nf
            mid_bits: Any
            public = None if secret_parents else _public_mid(cand, hk, c)
            if k_mid == 0:
                onehot, mid_bits = None, torch.zeros(1, hk, max(n_mid, 0), dtype=torch.long)
            elif public is not None and bool((public.sum(-1) <= k_mid).all()):
                mid_bits = public  # every candidate is picked: a public choice
                onehot = _public_onehot(public, k_mid)
            else:
                u = qg.matmul(boxes[lvl][2].transpose(-1, -2))  # [1, Hk, G, C]
                if g > 1:
                    u = tree_max(u, dim=2) if method.group_reduce == "max" else u.sum(2)
                else:
                    u = u.squeeze(2)
                if secret_parents:
                    branch = sizes[lvl - 1] // s
                    cand_u, to_mid = _child_candidates(u, levels[-1], branch, c)
                    picks = secure_topk(cand_u, k_mid, network=method.topk_network)
                    onehot = picks.matmul(to_mid)  # [1, Hk, k_mid, n_mid]
                else:
                    u = u[..., 1 : c - 1]
                    if cand is not None:
                        u = _penalise(u, cand[..., 1 : c - 1])
                    onehot = secure_topk(u, k_mid, network=method.topk_network)  # [1, Hk, k_mid, n_mid]
                mid_bits = onehot.sum(-2)
            bits = _level_bits(c, mid_bits, hk)
            levels.append(LevelChoice(size=s, clusters=c, k_mid=k_mid, onehot=onehot, bits=bits))
            if lvl + 1 < len(sizes):
                secret_parents = is_secret(bits)
                c_next = _public_int(n_valid[lvl + 1], "cluster count")
                cand = None if secret_parents else _children(bits, s // sizes[lvl + 1], c_next)
        return ClusterChoice(levels=levels, length=n)


# ======================================================================================== gather
def cluster_gather(cache: Any, onehot: Any, size: int, first: int, count: int) -> tuple[Any, Any]:
    """Rows of the clusters ``first … first + count − 1`` (all full) picked by ``onehot [1, Hk, k, count]``.

    Returns secret ``K, V [1, Hk, k·size, d]`` (exact). Public one-hot: local. Secret: the persistent
    cache's :meth:`gather_onehot` (opens ``Hk·k·C``) or one Beaver matmul ``onehot · [K̃ | Ṽ]`` (opens the
    one-hot and ``count·size·2d`` cache elements).
    """
    crypten = import_crypten()
    hk, d = cache.kv_heads, cache.head_dim
    k = onehot.shape[2]
    keys, values = cache.keys(), cache.values()
    lo, hi = first * size, (first + count) * size
    if not is_secret(onehot) or not is_persistent(cache):
        kt = keys[:, :, lo:hi].reshape(1, hk, count, size * d)
        vt = values[:, :, lo:hi].reshape(1, hk, count, size * d)
        both = crypten.cat([kt, vt], dim=-1)  # [1, Hk, count, 2·s·d]
        if is_secret(onehot):
            rows = onehot.matmul(both)
        else:
            rows = both.clone()
            rows.share = onehot.long().matmul(both.share)
        rows = rows.reshape(1, hk, k, 2, size, d)
        return rows[:, :, :, 0].reshape(1, hk, k * size, d), rows[:, :, :, 1].reshape(1, hk, k * size, d)
    c = -(-cache.max_length // size)
    pad_lo = torch.zeros(1, hk, k, first, dtype=torch.long)
    pad_hi = torch.zeros(1, hk, k, c - first - count, dtype=torch.long)
    full = _from_share(torch.cat([pad_lo, onehot.share, pad_hi], dim=-1), 0)
    return cache.gather_onehot(full, size, "keys"), cache.gather_onehot(full, size, "values")


def gather_clusters(cache: Any, choice: ClusterChoice) -> tuple[Any, Any, torch.Tensor, None]:
    """The :class:`Selection` ``gather``: rows of the picked finest clusters in ascending token order.

    Cluster 0 and the last cluster are sliced publicly, the middle picks gathered by the secret one-hot.
    Returns ``(K, V [1, Hk, R, d], lengths [1, Hk] = R, None)``; ``R`` is public.
    """
    crypten = import_crypten()
    f = choice.final
    n, s, c = cache.max_length, f.size, f.clusters
    if n != choice.length:
        raise ConfigError(f"mpcache: selection made for {choice.length} rows applied to a cache of {n}")
    with comm.op("gather"):
        keys, values = cache.keys(), cache.values()
        ks, vs = [keys[:, :, : min(s, n)]], [values[:, :, : min(s, n)]]
        if f.k_mid > 0:
            mk, mv = cluster_gather(cache, f.onehot, s, 1, c - 2)
            ks.append(mk)
            vs.append(mv)
        if c >= 2:
            ks.append(keys[:, :, (c - 1) * s : n])
            vs.append(values[:, :, (c - 1) * s : n])
        k_rows = ks[0] if len(ks) == 1 else crypten.cat(ks, dim=2)
        v_rows = vs[0] if len(vs) == 1 else crypten.cat(vs, dim=2)
    lengths = torch.full((1, cache.kv_heads), choice.rows, dtype=torch.long)
    return k_rows, v_rows, lengths, None


def _make_gather(choice: ClusterChoice) -> Callable[[Any], tuple[Any, Any, torch.Tensor, None]]:
    def gather(cache: Any) -> tuple[Any, Any, torch.Tensor, None]:
        return gather_clusters(cache, choice)

    return gather


def select(method: MPCache, ctx: DecodeContext) -> Selection | None:
    """Secure twin of :meth:`MPCache.select`: a :class:`Selection` whose ``gather`` is oblivious.

    ``index``/``valid`` only carry the public size (``R`` columns, all valid, index 0); the picked
    clusters stay secret (``ctx.state["mpcache_levels"]`` holds the :class:`ClusterChoice`). A follower
    layer returns its leader's selection unchanged (no selection traffic).
    """
    check_context(method, ctx)
    if ctx.layer in method.dense_layers:
        return None
    leader = method.leader_of(ctx.layer, ctx.num_layers)
    if leader is not None:
        entry = method._slot(ctx, leader).get(_SHARED_SEL)
        if entry is None or entry[0] != ctx.step or not torch.equal(entry[1], ctx.cache.lengths):
            raise ConfigError(f"mpcache: layer {ctx.layer} has no matching selection of layer {leader}")
        return entry[2]
    choice = select_clusters(method, ctx)
    ctx.state["mpcache_levels"] = choice
    sel = None
    if choice is not None:
        rows = choice.rows
        sel = Selection(
            index=torch.zeros(1, ctx.cache.kv_heads, rows, dtype=torch.long),
            valid=torch.ones(1, ctx.cache.kv_heads, rows, dtype=torch.bool),
            gather=_make_gather(choice),
        )
    method._slot(ctx, ctx.layer)[_SHARED_SEL] = (ctx.step, ctx.cache.lengths.clone(), sel)
    return sel
