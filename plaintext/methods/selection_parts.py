"""Building blocks shared by the query-aware selectors (TokenSelect, CTkvr, DELTA, NOSA).

See ``shared/research/selection_summary.md`` §2: every selector here is *scorer → head aggregator →
forced set → top-k → (reuse)*. This module holds those parts once, vectorised over ``[B, Hk, ...]`` (no
Python loop over heads or tokens), so that a method file reads like its card:

* :func:`head_scores` — exact per-query-head ``q·k`` over cache rows, GQA without repeating keys.
* :func:`soft_vote` / :func:`max_over_heads` — head aggregators (softmax → sum; max of probabilities),
  optionally shared by every KV head of a sequence (:func:`shared_layout` says when that is meaningful).
* :func:`forced_split` / :func:`assemble` — sinks + recent window around a top-k part, merged into one
  sorted, valid-first index list.
* :func:`pool_blocks` / :func:`blocks_to_tokens` — token ↔ block (page) granularity.
* :func:`page_bounds` — Quest's per-page key min/max, updated in place for one appended entry (a
  coarse pre-filter before exact token scoring).
* :func:`union_ids` — de-duplicated, ascending union of candidate id lists (a bitmap, no sort);
  :func:`mask_to_index` — a bool mask's set entries as index lists (the same ``nonzero``).
* :func:`query_reuse` — the Selection-Cache test (cosine of the query and the query that produced the
  cached selection, one decision per sequence).
* :func:`row_tokens` / :func:`uniform_length` — budgets per ``(sequence, KV head)`` row.

The one top-k is :func:`mpckv.plaintext.methods.topk.select_topk` (masks, per-row ``k``) or its mask-free
fast form :func:`~mpckv.plaintext.methods.topk.topk_ascending`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mpckv.budget import Budget
from mpckv.kernels.page_bounds import grow_page_bounds, page_minmax, widen_page_bounds_
from mpckv.plaintext.kv_cache import LayerCache

__all__ = [
    "assemble",
    "blocks_to_tokens",
    "page_bounds",
    "union_ids",
    "forced_sizes",
    "forced_split",
    "head_scores",
    "mask_to_index",
    "max_over_heads",
    "pool_blocks",
    "query_reuse",
    "row_tokens",
    "shared_layout",
    "soft_vote",
    "uniform_length",
]

_BIG = torch.iinfo(torch.long).max


def uniform_length(lengths: torch.Tensor) -> int | None:
    """The common length of every row of ``lengths [B, Hk]``, or ``None`` when rows differ."""
    flat = lengths.flatten().tolist()
    return int(flat[0]) if flat and all(x == flat[0] for x in flat) else None


def shared_layout(cache: LayerCache) -> bool:
    """Whether every KV head of a sequence holds the same entries at the same cache index.

    True for a cache that was never compacted (``version == 0``: index = original position for every
    head) whose rows have equal lengths within each sequence. Only then may one index list serve all
    heads of a sequence (TokenSelect's voting, DELTA's shared pages).
    """
    lengths = cache.lengths
    return cache.version == 0 and bool((lengths == lengths[:, :1]).all())


def row_tokens(budget: Budget, lengths: torch.Tensor, layer: int) -> torch.Tensor:
    """Token budget ``[B, Hk]`` (int64) of every row for its current length (``tokens_for``)."""
    rows = [[budget.tokens_for(int(n), layer, h) for h, n in enumerate(row)] for row in lengths.tolist()]
    return torch.tensor(rows, dtype=torch.long, device=lengths.device).view_as(lengths)


def forced_split(tokens: int, sinks: int, window: int, share: int = 4) -> tuple[int, int]:
    """Sink and window sizes that fit a budget of ``tokens``: each capped at ``tokens // share``.

    Keeps the paper's forced sizes when the budget is large and leaves most of a small budget to the
    query-aware part (a 12-token budget with sinks 128 / window 512 gets 3 + 3).
    """
    cap = max(tokens // share, 0)
    return min(sinks, cap), min(window, cap)


def forced_sizes(
    tokens: torch.Tensor, sinks: int, window: int, share: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forced_split` for every row of a budget tensor ``tokens [B, Hk]`` → sinks, window (int64)."""
    pairs = [forced_split(t, sinks, window, share) for t in tokens.flatten().tolist()]
    dev = tokens.device
    s = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=dev).view_as(tokens)
    w = torch.tensor([b for _, b in pairs], dtype=torch.long, device=dev).view_as(tokens)
    return s, w


def head_scores(q: torch.Tensor, keys: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · q_h · k_t`` for every query head and cache row: ``[B, Hk, G, L]`` (fp32).

    ``q [B, H, d]`` (head ``h`` reads KV head ``h // G``), ``keys [B, Hk, L, d]`` (any strides; a
    prefix view of the cache is not copied).
    """
    b, h, d = q.shape
    hk = keys.shape[1]
    qg = q.float().view(b, hk, h // hk, d)
    if scale != 1.0:
        qg = qg * scale
    # keys @ qᵀ (a tall GEMM per KV head) is ~2x faster on CPU BLAS than q @ keysᵀ; the result is a
    # transposed view [B, Hk, G, L]
    return (keys.float() @ qg.transpose(-1, -2)).transpose(-1, -2)


def _masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row with nothing finite gives zeros (not NaN)."""
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num_(p, nan=0.0)


def soft_vote(scores: torch.Tensor, share: bool) -> torch.Tensor:
    """TokenSelect's soft voting: softmax over tokens per query head, summed over heads.

    ``scores [B, Hk, G, L]`` (``-inf`` = not a candidate) → ``[B, Hk, L]``: the sum over the group of
    each KV head, or, with ``share``, over all ``H`` heads (then every KV head gets the same vote; the
    returned tensor is an expanded view).
    """
    vote = _masked_softmax(scores).sum(dim=2)
    if share:
        vote = vote.sum(dim=1, keepdim=True).expand_as(vote)
    return vote


def max_over_heads(probs: torch.Tensor, kv_heads: int, share: bool) -> torch.Tensor:
    """DELTA's token score: the maximum attention probability over heads, ``[B, H, L] → [B, Hk, L]``.

    Over the group of each KV head, or over all heads with ``share`` (an expanded view).
    """
    b, h, n = probs.shape
    s = probs.view(b, kv_heads, h // kv_heads, n).amax(dim=2)
    if share:
        s = s.amax(dim=1, keepdim=True).expand_as(s)
    return s


def pool_blocks(
    scores: torch.Tensor, block: int, reducer: Literal["sum", "max", "mean"], fill: float = 0.0
) -> torch.Tensor:
    """Pool the last dim of ``scores [..., L]`` into ``ceil(L / block)`` blocks (tail padded by ``fill``)."""
    n = scores.shape[-1]
    nb = -(-n // block)
    x = F.pad(scores, (0, nb * block - n), value=fill).unflatten(-1, (nb, block))
    if reducer == "sum":
        return x.sum(-1)
    if reducer == "max":
        return x.amax(-1)
    return x.mean(-1)


def blocks_to_tokens(
    blocks: torch.Tensor, valid: torch.Tensor, block: int, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of selected blocks ``[B, Hk, K]`` (ascending, valid first) → ``[B, Hk, W]``.

    Entries past a row's length are dropped; the result is ascending with the valid columns first and
    trimmed to the widest row.
    """
    b, hk, kb = blocks.shape
    tok = (blocks[..., None] * block + torch.arange(block, device=blocks.device)).reshape(b, hk, kb * block)
    ok = valid[..., None].expand(b, hk, kb, block).reshape(b, hk, kb * block)
    ok = ok & (tok < lengths[..., None])
    if kb * block > 1 and bool((ok[..., 1:] <= ok[..., :-1]).all()):
        # valid-first blocks in ascending order give ascending tokens whose invalid ones (padding blocks,
        # the tail past the length, which sits in the last valid block) all come last: no sort needed
        width = int(ok.sum(-1).max()) if ok.numel() else 0
        idx = torch.where(ok, tok, torch.zeros_like(tok))
        return idx[..., :width].contiguous(), ok[..., :width].contiguous()
    return _valid_first(tok, ok)


def _valid_first(index: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = torch.where(valid, index, torch.full_like(index, _BIG))
    key, order = torch.sort(key, dim=-1, stable=True)
    ok = torch.gather(valid, -1, order)
    width = int(ok.sum(-1).max()) if ok.numel() else 0
    idx = torch.where(ok, key, torch.zeros_like(key))
    return idx[..., :width].contiguous(), ok[..., :width].contiguous()


def assemble(
    lengths: torch.Tensor,
    sinks: torch.Tensor,
    window: torch.Tensor,
    top: torch.Tensor,
    top_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of ``[0, sinks)``, the ``top`` part and ``[n − window, n)`` per row, sorted, valid first.

    ``lengths, sinks, window [B, Hk]`` (int64), ``top, top_valid [B, Hk, W]``. Entries of ``top`` that
    fall inside the forced ranges or past the row's length are dropped (no duplicates).
    """
    dev = lengths.device
    ms, mw = int(sinks.max()), int(window.max())
    si = torch.arange(ms, device=dev).expand(*lengths.shape, ms)
    wi = (lengths - window)[..., None] + torch.arange(mw, device=dev)
    s_ok = si < sinks[..., None]
    w_ok = wi < lengths[..., None]
    t_ok = top_valid & (top >= sinks[..., None]) & (top < (lengths - window)[..., None])
    idx = torch.cat([si, top, wi], dim=-1)
    ok = torch.cat([s_ok, t_ok, w_ok], dim=-1)
    if bool(ok.all()):
        return idx, ok  # already ascending: the three ranges are disjoint and ordered
    return _valid_first(idx, ok)


def query_reuse(q: torch.Tensor, q_prev: torch.Tensor | None, theta: float) -> torch.Tensor:
    """Selection-Cache hits ``[B]`` (bool): ``cos(q, q_prev) >= theta`` per sequence.

    ``q [B, H, d]`` is flattened per sequence; no cached query (or a shape change) is a miss everywhere.
    """
    b = q.shape[0]
    if q_prev is None or q_prev.shape != q.shape or theta > 1.0:
        return torch.zeros(b, dtype=torch.bool, device=q.device)
    a, c = q.float().reshape(b, -1), q_prev.float().reshape(b, -1)
    cos = F.cosine_similarity(a, c, dim=-1, eps=1e-12)
    return cos >= theta


def page_bounds(
    cache: LayerCache, state: dict[str, object], page_size: int, key: str = "pb"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page key bounds ``kmin, kmax [B, Hk, n_pages, d]`` (fp32) of ``cache``, kept in ``state``.

    The same bookkeeping as Quest's (:mod:`mpckv.kernels.page_bounds`): rebuilt after a compaction or a
    change of more than one entry per row, else only the page receiving the appended entry is widened.
    """
    lengths = cache.lengths
    n_pages = -(-cache.max_length // page_size)
    prev = state.get(f"{key}_lengths")
    same = (
        isinstance(prev, torch.Tensor)
        and prev.shape == lengths.shape
        and state.get(f"{key}_version") == cache.version
        and state.get(f"{key}_page_size") == page_size
    )
    grown = lengths - prev if same and isinstance(prev, torch.Tensor) else None
    if grown is None or not bool(((grown == 0) | (grown == 1)).all()):
        kmin, kmax = page_minmax(cache.keys(), lengths, page_size)
    else:
        old_min, old_max = state[f"{key}_kmin"], state[f"{key}_kmax"]
        assert isinstance(old_min, torch.Tensor) and isinstance(old_max, torch.Tensor)
        kmin, kmax = grow_page_bounds(old_min, old_max, n_pages)
        widen_page_bounds_(kmin, kmax, cache.k, lengths, grown, page_size)
    state.update(
        {
            f"{key}_kmin": kmin,
            f"{key}_kmax": kmax,
            f"{key}_lengths": lengths.clone(),
            f"{key}_version": cache.version,
            f"{key}_page_size": page_size,
        }
    )
    return kmin[:, :, :n_pages], kmax[:, :, :n_pages]


def union_ids(
    n: int, lists: list[tuple[torch.Tensor, torch.Tensor]], ranges: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending, de-duplicated union of id lists and ranges per row: ``(index, valid) [B, Hk, M]``.

    ``lists``: ``(ids, valid) [B, Hk, *]`` with ids in ``[0, n)``; ``ranges``: ``(start, stop) [B, Hk]``
    half-open, meant to be short (they are expanded to id lists). One bitmap ``[B, Hk, n]`` and a
    ``nonzero`` (already in ascending order) — no sort.
    """
    ref = ranges[0][0] if ranges else lists[0][0]
    b, hk = ref.shape[:2]
    dev = ref.device
    items = list(lists)
    for start, stop in ranges:  # short ranges (sinks, window): as id lists
        width = int((stop - start).clamp_min(0).max()) if start.numel() else 0
        ids = start[..., None] + torch.arange(width, device=dev)
        items.append((ids, ids < stop[..., None]))
    mark = torch.zeros(b, hk, n + 1, dtype=torch.bool, device=dev)  # column n swallows invalid ids
    for ids, ok in items:
        flat = torch.where(ok, ids, torch.full_like(ids, n)).reshape(b, hk, -1)
        mark.scatter_(2, flat, True)
    return mask_to_index(mark[..., :n])


def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The set entries of every row of a bool ``mask [B, Hk, N]`` as ``(index, valid) [B, Hk, M]``.

    Ascending, valid first, padding index 0, ``M`` = the largest row count. One ``nonzero`` (already in
    ascending order) and a scatter of the ``M``-sized result: no pass over ``N`` in int64.
    """
    b, hk, n = mask.shape
    dev = mask.device
    counts = mask.sum(-1)  # [B, Hk]
    width = int(counts.max()) if counts.numel() else 0
    rows, ids = mask.reshape(b * hk, n).nonzero(as_tuple=True)
    flat = counts.flatten()
    offsets = torch.cumsum(flat, 0) - flat
    cols = torch.arange(ids.shape[0], device=dev) - offsets[rows]
    index = torch.zeros(b * hk, width, dtype=torch.long, device=dev)
    index[rows, cols] = ids
    valid = torch.arange(width, device=dev) < flat[:, None]
    return index.view(b, hk, width), valid.view(b, hk, width)
