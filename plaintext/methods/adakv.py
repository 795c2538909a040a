"""AdaKV — head-adaptive budgets: the KV heads of a layer compete for one layer budget.

Feng, Lv, Cao, Xie, Zhou. *Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference.* arXiv 2407.11550, 2024 (official code FFY0/AdaKV, flattened varlen cache; kvpress
``AdaKVPress``). Formulas: ``shared/research/eviction_summary.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpckv.plaintext.methods.base import KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import (
    GROUP_REDUCES,
    POOLINGS,
    check_choice,
    pool_scores,
    prompt_capacities,
    reduce_group,
    window_votes,
)
from mpckv.plaintext.methods.topk import select_topk
from mpckv.plaintext.storage.ragged_cache import RaggedCache
from mpckv.registry import register_method

SCORERS = ("snapkv", "votes", "attention", "keynorm")


def head_adaptive_keep(
    scores: torch.Tensor, lengths: torch.Tensor, caps: torch.Tensor, window: int, alpha: float
) -> torch.Tensor:
    """AdaKV's allocation: boolean kept mask ``[B, Hk, L]``.

    Rows with ``N ≤ C`` keep everything. Otherwise, per sample, every head keeps its last ``min(w, C)``
    entries and its own top ``⌊α·(C − w)⌋`` prefix entries (the safeguard), and the rest of the layer
    budget ``Σ_h C_h`` goes to the best remaining prefix entries of *all* heads of that sample (one
    flattened top-k; ties to the lower head, then the lower index).
    """
    b, hk, length = scores.shape
    col = torch.arange(length, device=scores.device)
    live = col < lengths[..., None]
    w_eff = torch.minimum(caps, torch.full_like(caps, window))
    win = live & (col >= (lengths - w_eff)[..., None])
    prefix = live & ~win
    safe_k = torch.floor(alpha * (caps - w_eff).float() + 1e-6).long().clamp_min(0)
    s = scores.float().masked_fill(~prefix, float("-inf"))
    idx, val = select_topk(s, safe_k, invalid=~prefix)
    safe = torch.zeros(b, hk, length, dtype=torch.long, device=s.device).scatter_add_(2, idx, val.long()) > 0
    forced = win | safe
    rest = (caps.sum(1) - forced.sum((1, 2))).clamp_min(0)  # [B]
    free = prefix & ~forced
    gidx, gval = select_topk(s.reshape(b, hk * length), rest, invalid=~free.reshape(b, hk * length))
    picked = (
        torch.zeros(b, hk * length, dtype=torch.long, device=s.device).scatter_add_(1, gidx, gval.long()) > 0
    )
    keep = forced | (picked.view(b, hk, length) & free)  # (padding columns of the top-k add 0)
    over = (lengths > caps).any(1)[:, None, None]
    return torch.where(over, keep, live)


@register_method("adakv")
@dataclass(kw_only=True)
class AdaKV(KVMethod):
    """Per layer and sample, keep ``Σ_h C_h`` entries over all KV heads chosen by one flattened top-k over
    a scorer's scores (each head guaranteed its window and ``⌊α·(C − w)⌋`` of its own best entries), on a
    ragged cache that stores each head's rows without padding.

    Parameters
    ----------
    scorer:
        ``"snapkv"`` (window votes pooled as SnapKV, default), ``"votes"`` (window votes, no pooling),
        ``"attention"`` (column sums of all prompt queries, H2O's prefill score) or ``"keynorm"`` (−‖k‖).
    alpha:
        Safeguard fraction α (AdaKV / kvpress: 0.2). ``1`` gives every head exactly its own ``C`` (SnapKV).
    window, kernel_size, pooling, group_reduce:
        As :class:`~mpckv.plaintext.methods.snapkv.SnapKV` (the window is always kept).
    budget:
        Capacity ``C`` per (sample, KV head) — the layer budget is ``Σ_h C_h`` (window included); default
        2048 tokens.

    Notes
    -----
    Deviations: (1) the window is forced per head and the safeguard counts the prefix only (kvpress gives
    window tokens the maximum score, so its safeguard is spent on the window first); (2) the kept entries
    are really stored ragged (:class:`~mpckv.plaintext.storage.ragged_cache.RaggedCache`; the official code
    uses a flattened varlen cache too, kvpress masks with fake keys and saves nothing); (3) ties go to the
    lower head, then the lower index; (4) a composition must run ``adakv`` first (its scores need the
    uncompacted prompt cache).
    """

    scorer: str = "snapkv"
    alpha: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    window: int = field(default=32, metadata={"min": 1})
    kernel_size: int = field(default=7, metadata={"min": 1})
    pooling: str = "max"
    group_reduce: str = "mean"

    family = "eviction"
    paper = "Feng et al., arXiv 2407.11550 (2024)"
    secure = "planned"
    secure_note = "the flattened top-k is a secure top-k over Hk·N; ragged row lengths would be revealed"
    default_budget = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "scorer", self.scorer, SCORERS)
        check_choice(self.name, "pooling", self.pooling, POOLINGS)
        check_choice(self.name, "group_reduce", self.group_reduce, GROUP_REDUCES)
        if self.kernel_size % 2 == 0:
            from mpckv.errors import ConfigError

            raise ConfigError(f"{self.name}: kernel_size must be odd, got {self.kernel_size}")

    def scores(self, ctx: PrefillContext) -> torch.Tensor:
        """``[B, Hk, L]`` scores of the chosen scorer (higher = keep)."""
        cache = ctx.cache
        if self.scorer == "keynorm":
            return -cache.keys().float().norm(dim=-1)
        if self.scorer == "attention":
            return window_votes(ctx, int(ctx.q.shape[2]), self.group_reduce)
        if self.scorer == "votes":
            return window_votes(ctx, self.window, self.group_reduce)
        prefix = (cache.lengths - self.window).clamp_min(0)
        commute = self.kernel_size == 1 or (self.pooling == "avg" and self.group_reduce != "max")
        commute = commute or (self.pooling == "max" and self.group_reduce == "max")
        if commute:  # the same order of operations as snapkv_compress
            return pool_scores(
                window_votes(ctx, self.window, self.group_reduce), self.kernel_size, self.pooling, prefix
            )
        per_head = window_votes(ctx, self.window, per_query_head=True)
        g = per_head.shape[1] // cache.kv_heads
        pooled = pool_scores(per_head, self.kernel_size, self.pooling, prefix.repeat_interleave(g, dim=1))
        return reduce_group(pooled, cache.kv_heads, self.group_reduce)

    def on_prefill(self, ctx: PrefillContext) -> None:
        cache = ctx.cache
        caps = prompt_capacities(ctx, self.resolved_budget.tokens_for).to(cache.lengths.device)
        if bool((cache.lengths <= caps).all()):
            return
        keep = head_adaptive_keep(self.scores(ctx), cache.lengths, caps, self.window, self.alpha)
        counts = keep.sum(-1)
        index, valid = select_topk(keep.float(), counts, invalid=~keep)
        ctx.state["kept_per_head"] = counts
        ctx.replace_cache(RaggedCache.from_selection(cache, index, valid))
