"""Reusable scorers and appliers for the attention-score eviction methods (SnapKV, PyramidKV, H2O, …).

* :func:`window_votes` — column sums of the attention of the last ``w`` prompt queries (the observation
  window) over the prompt keys, per KV head (group-reduced) or per query head; with ``w ≥ T`` these are the
  prefill column sums of *all* prompt queries (H2O). Computed by
  :func:`mpckv.kernels.window_column_scores` (fp32, causal, chunked: never materialises ``[H, N, N]``).
* :func:`pool_scores` — SnapKV's 1-D max/avg pooling restricted to each row's valid prefix.
* :func:`reduce_group` — GQA reduction of per-query-head scores to KV heads.
* :func:`snapkv_compress` — the SnapKV-family prefill applier: window forced, top-(C − w) pooled votes of
  the prefix, cache compacted.
* :func:`keep_topk` — keep the ``k`` best entries of every cache row (forced/invalid masks) and compact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from mpckv.errors import ConfigError
from mpckv.kernels.window_scores import window_column_scores
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import PrefillContext
from mpckv.plaintext.methods.topk import select_topk

Pooling = Literal["max", "avg"]
GROUP_REDUCES = ("mean", "sum", "max")
POOLINGS = ("max", "avg")


def check_choice(method: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{method}: {name} must be one of {list(allowed)}, got {value!r}")


def reduce_group(x: torch.Tensor, kv_heads: int, group_reduce: str) -> torch.Tensor:
    """Reduce per-query-head scores ``[B, H, L]`` to KV heads ``[B, Hk, L]`` (mean | sum | max)."""
    b, h, n = x.shape
    g = x.view(b, kv_heads, h // kv_heads, n)
    if group_reduce == "mean":
        return g.mean(2)
    if group_reduce == "sum":
        return g.sum(2)
    return g.amax(2)


def _require_fresh(ctx: PrefillContext) -> None:
    if ctx.cache.version != 0:
        raise ConfigError(
            "attention-score eviction needs the uncompacted prompt cache (cache index = position); "
            "put it first in a composition"
        )


def window_votes(
    ctx: PrefillContext, window: int, group_reduce: str = "mean", per_query_head: bool = False
) -> torch.Tensor:
    """Sum over the last ``window`` prompt queries of their causal softmax over the prompt keys.

    Parameters
    ----------
    ctx:
        Prefill context of one layer; the cache must still hold the whole prompt in order.
    window:
        Number of observation queries per sample (the last ``window`` real tokens; fewer when the prompt is
        shorter). ``window ≥ T`` gives the column sums of all prompt queries.
    group_reduce:
        GQA reduction over the query heads of a KV head (ignored with ``per_query_head``).
    per_query_head:
        Return ``[B, H, L]`` (one score row per query head) instead of ``[B, Hk, L]``.

    Returns
    -------
    torch.Tensor
        fp32 votes over the cache layout (``L = cache.max_length``); entries beyond a row's length are 0.
    """
    _require_fresh(ctx)
    cache = ctx.cache
    q = ctx.q
    b, h, t, d = q.shape
    hk = cache.kv_heads
    w = max(1, min(window, t))
    n = ctx.prompt_lengths.to(q.device)
    idx = n[:, None] - w + torch.arange(w, device=q.device)  # [B, w]
    q_pos = torch.where(idx >= 0, idx, torch.full_like(idx, -1))
    q_win = torch.gather(q, 2, idx.clamp_min(0)[:, None, :, None].expand(b, h, w, d))
    keys, lengths = cache.keys(), cache.lengths
    if q_win.dtype != keys.dtype:
        q_win = q_win.to(keys.dtype)
    if not per_query_head:
        return window_column_scores(q_win, keys, lengths, q_pos, scale=ctx.scale, group_reduce=group_reduce)
    g = h // hk
    qg = q_win.view(b, hk, g, w, d)
    per = [window_column_scores(qg[:, :, i], keys, lengths, q_pos, scale=ctx.scale) for i in range(g)]
    return torch.stack(per, dim=2).reshape(b, h, keys.shape[2])


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str, lengths: torch.Tensor) -> torch.Tensor:
    """Stride-1 pooling (``kernel_size // 2`` padding) of ``scores [..., N]`` over each row's ``[0, len)``.

    Entries at or beyond ``lengths [...]`` act as padding: ``-inf`` for max pooling (PyTorch's max-pool
    padding) and ``0`` for avg pooling, whose divisor is always ``kernel_size`` (``count_include_pad=True``,
    so the first/last ``kernel_size // 2`` entries are slightly penalised, as in SnapKV's avgpool).
    Output entries beyond a row's length are meaningless.
    """
    if kernel_size == 1:
        return scores
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"pooling kernel_size must be odd and >= 1, got {kernel_size}")
    n = scores.shape[-1]
    fill = float("-inf") if pooling == "max" else 0.0
    inside = torch.arange(n, device=scores.device) < lengths[..., None]
    x = scores.float().masked_fill(~inside, fill).reshape(-1, 1, n)
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad), value=fill)
    out = (
        F.max_pool1d(x, kernel_size, stride=1) if pooling == "max" else F.avg_pool1d(x, kernel_size, stride=1)
    )
    return out.reshape(scores.shape)


def keep_topk(
    cache: LayerCache, scores: torch.Tensor, k: torch.Tensor, forced: torch.Tensor | None = None
) -> bool:
    """Keep the ``k [B, Hk]`` best live entries of every row by ``scores [B, Hk, L]`` and compact.

    ``forced`` entries are always kept. Rows whose length is already ``≤ k`` keep everything; when every
    row does, nothing is touched (bit-exact). Returns whether the cache was compacted.
    """
    k = k.to(cache.lengths.device)
    if bool((cache.lengths <= k).all()):
        return False
    invalid = ~cache.valid()
    if forced is not None:
        forced = forced & ~invalid
    index, valid = select_topk(scores, k, forced, invalid)
    cache.compact(index, valid)
    return True


def snapkv_compress(
    ctx: PrefillContext,
    caps: torch.Tensor,
    window: int,
    kernel_size: int = 1,
    pooling: str = "max",
    group_reduce: str = "mean",
) -> None:
    """SnapKV-family prefill eviction with capacities ``caps [B, Hk]`` (window included).

    Rows with ``N ≤ C`` are untouched. Otherwise the last ``min(w, C)`` tokens are forced, and the remaining
    ``C − w`` slots go to the prefix tokens ``j < N − w`` with the highest pooled window votes (ties → lower
    index). Pooling runs per query head before the GQA reduction (kvpress order) unless the two commute.
    """
    cache = ctx.cache
    n = cache.lengths
    caps = caps.to(n.device)
    if bool((n <= caps).all()):
        return
    linear_pool = kernel_size == 1 or (pooling == "avg" and group_reduce != "max")
    commute = linear_pool or (pooling == "max" and group_reduce == "max")
    prefix = (n - window).clamp_min(0)
    if commute:
        votes = pool_scores(window_votes(ctx, window, group_reduce), kernel_size, pooling, prefix)
    else:
        per_head = window_votes(ctx, window, per_query_head=True)
        g = per_head.shape[1] // cache.kv_heads
        pooled = pool_scores(per_head, kernel_size, pooling, prefix.repeat_interleave(g, dim=1))
        votes = reduce_group(pooled, cache.kv_heads, group_reduce)
    col = torch.arange(votes.shape[-1], device=votes.device)
    votes = votes.masked_fill(col >= prefix[..., None], float("-inf"))
    w_eff = torch.minimum(caps, torch.full_like(caps, window))
    forced = col >= (n - w_eff)[..., None]
    keep_topk(cache, votes, caps, forced)


def prompt_capacities(ctx: PrefillContext, tokens_for: Callable[[int, int, int], int]) -> torch.Tensor:
    """``[B, Hk]`` long tensor of ``tokens_for(n, layer, head)`` over the samples' prompt lengths."""
    rows = [
        [tokens_for(int(n), ctx.layer, h) for h in range(ctx.cache.kv_heads)]
        for n in ctx.prompt_lengths.tolist()
    ]
    return torch.tensor(rows, dtype=torch.long, device=ctx.cache.lengths.device)
