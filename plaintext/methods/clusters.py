"""Pure tensor helpers of MPCache: static-eviction votes, cluster boxes, linear proxy, hierarchical selection.

Static eviction: :func:`static_window_sizes`, :func:`static_keep_counts` (public kept counts),
:func:`static_forced` (sinks and observation window) and :func:`static_scores` (window attention mass).

A *cluster* of size ``s`` is a run of ``s`` consecutive cache entries of one (sequence, KV head) row
(the Quest page; cluster ``c`` holds entries ``[c·s, (c+1)·s)``). Its *box* is the channel-wise min and
max of its keys, built by :func:`mpckv.kernels.page_bounds.page_minmax` and appended to by
:func:`~mpckv.kernels.page_bounds.update_page_minmax`. Levels use cluster sizes ``s_1 > s_2 > …`` with each
size dividing the previous one, so cluster ``c`` of level ``l`` has the children
``c·r … c·r + r − 1`` (``r = s_l / s_{l+1}``) at level ``l + 1``.

Everything here takes plain tensors and public sizes so that a secure backend can reuse the math:
:func:`proxy_vectors`, :func:`proxy_scores`, :func:`level_budgets`, :func:`children_mask`,
:func:`hierarchical_select` and :func:`clusters_to_tokens`. Only :func:`tracked_boxes` touches engine state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mpckv.kernels._common import reduce_groups
from mpckv.kernels.page_bounds import grow_page_bounds, num_valid_pages, page_minmax, widen_page_bounds_
from mpckv.kernels.window_scores import window_column_scores
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.topk import select_topk

Levels = list[tuple[torch.Tensor, torch.Tensor]]
STATIC_MODES = ("layer", "head")

__all__ = [
    "children_mask",
    "cluster_boxes",
    "clusters_to_tokens",
    "hierarchical_select",
    "level_budgets",
    "num_clusters",
    "proxy_scores",
    "proxy_vectors",
    "static_forced",
    "static_keep_counts",
    "static_scores",
    "static_window_sizes",
    "tracked_boxes",
    "tracked_proxy",
]


def num_clusters(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Clusters holding a live entry, ``ceil(lengths / size)``, as int64 ``[B, Hk]``."""
    return num_valid_pages(lengths, size)


def cluster_boxes(keys: torch.Tensor, lengths: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``rmin, rmax [B, Hk, C, d]`` (fp32) over the live keys; a partial last cluster only covers its
    real entries (no overlap padding) and empty clusters hold ``+inf`` / ``-inf``."""
    return page_minmax(keys, lengths, size)


def tracked_boxes(
    state: dict[str, Any], cache: LayerCache, size: int, tag: str, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of ``cache`` at cluster ``size``, maintained incrementally in ``state[tag + …]``.

    Rebuilt from scratch on the first call, after a compaction (``cache.version`` changed) or when a row
    grew by more than one entry since the last call; otherwise only the cluster receiving the entry
    appended at ``lengths − 1`` is widened, in place (2·d comparisons per row, the paper's maintenance
    cost). The buffers keep spare clusters and grow in chunks; the returned tensors are views of the
    live clusters. ``length`` (the common row length, when the caller knows all rows share one) skips
    the tensor bookkeeping of the common decode step. ``state[tag + "_updated"]`` tells
    :func:`tracked_proxy` what changed: a cluster index, or ``None`` (rebuilt or several clusters).
    """
    lengths = cache.lengths
    n_clusters = -(-(cache.max_length if length is None else length) // size)
    same = state.get(tag + "_version") == cache.version and tag + "_min" in state
    state[tag + "_updated"] = None
    if same and length is not None and state.get(tag + "_n") == length - 1:
        rmin, rmax = grow_page_bounds(state[tag + "_min"], state[tag + "_max"], n_clusters)
        k_new = cache.k[:, :, length - 1].float()
        c = (length - 1) // size
        lo, hi = rmin[:, :, c], rmax[:, :, c]
        torch.minimum(lo, k_new, out=lo)
        torch.maximum(hi, k_new, out=hi)
        state.update({tag + "_min": rmin, tag + "_max": rmax, tag + "_n": length, tag + "_lengths": None})
        state[tag + "_updated"] = c
        return rmin[:, :, :n_clusters], rmax[:, :, :n_clusters]
    prev = state.get(tag + "_lengths")
    if prev is None and state.get(tag + "_n") is not None:
        prev = torch.full_like(lengths, state[tag + "_n"])
    grown = lengths - prev if same and prev is not None and prev.shape == lengths.shape else None
    if grown is None or not bool(((grown == 0) | (grown == 1)).all()):
        rmin, rmax = cluster_boxes(cache.keys(), lengths, size)
    else:
        rmin, rmax = grow_page_bounds(state[tag + "_min"], state[tag + "_max"], n_clusters)
        widen_page_bounds_(rmin, rmax, cache.k, lengths, grown, size)
    state.update(
        {tag + "_min": rmin, tag + "_max": rmax, tag + "_lengths": lengths.clone(), tag + "_n": None}
    )
    state[tag + "_version"] = cache.version
    return rmin[:, :, :n_clusters], rmax[:, :, :n_clusters]


def tracked_proxy(
    state: dict[str, Any], cache: LayerCache, size: int, tag: str, alpha: float, length: int | None = None
) -> torch.Tensor:
    """Proxy vectors (:func:`proxy_vectors`) of the tracked boxes, maintained in place like the boxes:
    only the widened cluster is recomputed on a plain decode step. Returns ``[B, Hk, C, d]`` (a view)."""
    rmin, rmax = tracked_boxes(state, cache, size, tag, length)
    c = state[tag + "_updated"]
    r = state.get(tag + "_proxy")
    if c is None or r is None or r.shape[:2] != rmin.shape[:2]:
        r = proxy_vectors(state[tag + "_min"], state[tag + "_max"], alpha)
    else:
        if r.shape[2] < state[tag + "_min"].shape[2]:  # the boxes grew: spare clusters are empty (0)
            r = F.pad(r, (0, 0, 0, state[tag + "_min"].shape[2] - r.shape[2]))
        r[:, :, c] = alpha * rmax[:, :, c].float() + (1.0 - alpha) * rmin[:, :, c].float()
    state[tag + "_proxy"] = r
    return r[:, :, : rmin.shape[2]]


def proxy_vectors(rmin: torch.Tensor, rmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """MPCache representative ``r_c = α·rmax_c + (1 − α)·rmin_c`` ``[B, Hk, C, d]``; empty clusters get 0."""
    empty = (rmin > rmax).any(-1, keepdim=True)
    r = alpha * rmax.float() + (1.0 - alpha) * rmin.float()
    return torch.where(empty, torch.zeros_like(r), r)


def proxy_scores(
    q: torch.Tensor, r: torch.Tensor, n_valid: torch.Tensor, group_reduce: str = "mean"
) -> torch.Tensor:
    """Linear proxy ``u[c] = q·r_c`` per query head, reduced over each GQA group.

    Parameters
    ----------
    q:
        Decode queries ``[B, H, d]`` (post-RoPE; no ``1/√d``: the ranking does not depend on it).
    r:
        Proxy vectors ``[B, Hk, C, d]`` from :func:`proxy_vectors`.
    n_valid:
        Live clusters per row ``[B, Hk]``.
    group_reduce:
        ``"mean"``, ``"sum"`` or ``"max"`` over the ``G = H / Hk`` query heads of a KV head.

    Returns
    -------
    torch.Tensor
        fp32 ``[B, Hk, C]``, ``-inf`` for clusters ``≥ n_valid``.
    """
    b, h, d = q.shape
    hk, c = r.shape[1], r.shape[2]
    u = q.float().view(b, hk, h // hk, d) @ r.float().transpose(-1, -2)  # [B, Hk, G, C]
    u = reduce_groups(u, group_reduce, dim=2)
    col = torch.arange(c, device=u.device)
    return u.masked_fill(col >= n_valid.to(u.device)[..., None], float("-inf"))


def level_budgets(
    n_valid: Sequence[torch.Tensor],
    k_last: torch.Tensor,
    level_ratios: Sequence[float],
    sizes: Sequence[int],
) -> list[torch.Tensor]:
    """Clusters to pick per level, ``[B, Hk]`` each, forced clusters included (public sizes only).

    The last level picks ``min(C_L, k_last)``. An upper level ``l`` picks
    ``min(C_l, max(2, ⌊ρ_l·C_l⌋, need_l))`` where ``need_l = 1 + ⌈(k_{l+1} − c_last)/r_l⌉`` is the least
    number of parents (the forced last one, holding ``c_last`` children, plus full ones) whose children can
    host the ``k_{l+1}`` picks below.
    """
    ks: list[torch.Tensor] = [torch.minimum(k_last, n_valid[-1])]
    for lvl in range(len(sizes) - 2, -1, -1):
        c, r = n_valid[lvl], sizes[lvl] // sizes[lvl + 1]
        base = torch.floor(c.double() * level_ratios[lvl] + 1e-9).long().clamp_min(2)
        c_last = n_valid[lvl + 1] - (c - 1).clamp_min(0) * r
        need = 1 + torch.div(ks[0] - c_last + r - 1, r, rounding_mode="floor").clamp_min(0)
        ks.insert(0, torch.minimum(c, torch.maximum(base, need)))
    return ks


def children_mask(
    parent_index: torch.Tensor, parent_valid: torch.Tensor, n_children: int, branch: int
) -> torch.Tensor:
    """Boolean ``[B, Hk, n_children]``: cluster ``c`` is a child of a selected parent (``c // branch``)."""
    b, hk, _ = parent_index.shape
    width = int(parent_index.max()) + 1 if parent_index.numel() else 1
    width = max(width, -(-n_children // branch))
    # count hits: padding columns (index 0, valid False) add nothing
    hit = torch.zeros(b, hk, width, dtype=torch.long, device=parent_index.device)
    hit.scatter_add_(2, parent_index, parent_valid.long())
    picked = hit > 0
    parent = torch.arange(n_children, device=parent_index.device) // branch
    return picked[..., parent]


def hierarchical_select(
    scores: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    n_valid: Sequence[torch.Tensor],
    sizes: Sequence[int],
) -> Levels:
    """Coarse-to-fine top-k over cluster scores.

    Level ``l`` picks ``ks[l]`` of its live clusters by ``scores[l] [B, Hk, C_l]`` with
    :func:`~mpckv.plaintext.methods.topk.select_topk` (ties → lower index). Cluster 0 and the last live
    cluster (the one holding the current token) are forced at every level; below the first level only the
    children of the previous level's picks are candidates.

    Returns
    -------
    list of ``(index, valid)``
        One pair ``[B, Hk, K_l]`` per level (ascending, valid columns first).
    """
    out: Levels = []
    for lvl, (u, k, nv) in enumerate(zip(scores, ks, n_valid, strict=True)):
        c = torch.arange(u.shape[-1], device=u.device)
        invalid = c >= nv[..., None]
        if out:
            invalid = invalid | ~children_mask(*out[-1], u.shape[-1], sizes[lvl - 1] // sizes[lvl])
        forced = ((c == 0) | (c == (nv - 1)[..., None])) & ~invalid
        out.append(select_topk(u, k, forced=forced, invalid=invalid))
    return out


def clusters_to_tokens(
    index: torch.Tensor, valid: torch.Tensor, size: int, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand selected clusters ``[B, Hk, K]`` of ``size`` entries to cache indices ``[B, Hk, ≤ K·size]``.

    Entries past a row's length are dropped; the result is ascending with valid columns first and padding
    columns holding index 0 (the :class:`~mpckv.plaintext.methods.base.Selection` layout).
    """
    b, hk, kc = index.shape
    tok = (index[..., None] * size + torch.arange(size, device=index.device)).reshape(b, hk, kc * size)
    ok = valid[..., None].expand(b, hk, kc, size).reshape(b, hk, kc * size)
    ok = ok & (tok < lengths[..., None])
    key = torch.where(ok, tok, torch.full_like(tok, torch.iinfo(torch.long).max))
    key, order = torch.sort(key, dim=-1, stable=True)
    ok = torch.gather(ok, 2, order)
    width = int(ok.sum(-1).max()) if ok.numel() else 0
    out = torch.where(ok, key, torch.zeros_like(key))
    return out[..., :width].contiguous(), ok[..., :width].contiguous()


def static_window_sizes(prompt_lengths: torch.Tensor, window_frac: float) -> torch.Tensor:
    """Observation window ``W = clamp(⌊window_frac·n0⌋, 1, n0)`` per sample ``[B]``."""
    n0 = prompt_lengths.long()
    w = torch.floor(n0.double() * window_frac + 1e-9).long()
    return torch.minimum(w.clamp_min(1), n0)


def static_keep_counts(
    prompt_lengths: torch.Tensor, ratio: float, sinks: int, windows: torch.Tensor
) -> torch.Tensor:
    """Kept prompt tokens per sample ``[B]``: ``min(n0, max(⌈ratio·n0⌉, |sinks ∪ window|))`` — public."""
    n0 = prompt_lengths.long()
    want = torch.ceil(n0.double() * ratio - 1e-9).long()
    forced = torch.minimum(n0, n0.clamp(max=sinks) + windows.to(n0.device))
    return torch.minimum(n0, torch.maximum(want, forced))


def static_forced(
    prompt_lengths: torch.Tensor, windows: torch.Tensor, sinks: int, width: int
) -> torch.Tensor:
    """Boolean ``[B, width]``: the ``sinks`` first tokens and the last ``W`` prompt tokens of each sample."""
    col = torch.arange(width, device=prompt_lengths.device)
    n0 = prompt_lengths.long()[:, None]
    return ((col < sinks) | (col >= n0 - windows.to(n0.device)[:, None])) & (col < n0)


def static_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    prompt_lengths: torch.Tensor,
    windows: torch.Tensor,
    scale: float,
    mode: str = "layer",
    group_reduce: str = "mean",
) -> torch.Tensor:
    """Attention mass ``Σ_w softmax(q_w·Kᵀ·scale)`` of each prompt key from its sample's window queries.

    Parameters
    ----------
    q:
        Prompt queries ``[B, H, T, d]`` (right padded).
    keys:
        The uncompacted prompt keys ``[B, Hk, L, d]`` (cache index = position).
    prompt_lengths, windows:
        ``n0`` and ``W`` per sample ``[B]``: sample ``b`` uses its queries ``n0 − W … n0 − 1`` (causal).
    mode:
        ``"layer"``: mean over all query heads, one row repeated for every KV head; ``"head"``: one row per
        KV head, ``group_reduce`` over its query heads.

    Returns
    -------
    torch.Tensor
        fp32 ``[B, Hk, L]``; keys no window query can see score 0.
    """
    b, h, t, d = q.shape
    hk = keys.shape[1]
    n0 = prompt_lengths.long().to(q.device)
    w = windows.long().to(q.device)
    wmax = int(w.max()) if w.numel() else 1
    col = torch.arange(wmax, device=q.device)
    idx = n0[:, None] - wmax + col  # [B, wmax]
    live = col >= (wmax - w)[:, None]
    q_pos = torch.where(live & (idx >= 0), idx, torch.full_like(idx, -1))
    q_win = torch.gather(q, 2, idx.clamp(0, t - 1)[:, None, :, None].expand(b, h, wmax, d)).to(keys.dtype)
    lengths = n0[:, None].expand(b, hk).to(keys.device)
    reduce = "mean" if mode == "layer" else group_reduce
    votes = window_column_scores(q_win, keys, lengths, q_pos, scale=scale, group_reduce=reduce)
    if mode == "layer":
        votes = votes.mean(1, keepdim=True).expand_as(votes).contiguous()
    return votes
