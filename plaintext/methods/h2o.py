"""H2O — Heavy-Hitter Oracle: accumulated attention scores + a recent window, evicted every decode step.

Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen. *H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models.* NeurIPS 2023, arXiv 2306.14048 (official code
FMInference/H2O ``h2o_hf/utils_real_drop``).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.allocators import budget_entry_tokens
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext
from mpckv.plaintext.methods.column_scores import all_query_votes
from mpckv.plaintext.methods.scorers import check_choice, keep_topk, reduce_group
from mpckv.registry import register_method

SCORE = "h2o_score"
COUNT = "h2o_count"


@register_method("h2o")
@dataclass(kw_only=True)
class H2O(KVMethod):
    """Keep ``k = k_h + k_r`` entries per (sample, KV head): the ``k_r`` most recent and the ``k_h`` others
    with the largest accumulated attention; evict the lowest-scoring non-recent entry at every decode step.

    Prefill: the accumulated score of key ``j`` is the column sum of the causal softmax of *all* prompt
    queries (fp32, computed in query chunks), reduced over the GQA group; the cache is cut to ``k``. Decode:
    attention runs over the ``k + 1`` entries (the new one included), the group-reduced probabilities are
    added to the scores, and while a row holds more than ``k`` entries its lowest-scoring entry outside the
    last ``k_r`` is evicted (exactly one per step once full). Scores live in cache metadata
    (``"h2o_score"``), so they move with compaction.

    Parameters
    ----------
    heavy_ratio, recent_ratio:
        Without a budget: ``k_h = ⌊heavy_ratio·N⌋``, ``k_r = ⌊recent_ratio·N⌋`` of each prompt's length ``N``,
        fixed after prefill (paper scripts: 0.1 and 0.1).
    recent_fraction:
        With a budget: ``k`` = the budget's tokens (a ratio of ``N`` or an absolute count, not clamped to
        ``N``), ``k_r = ⌊recent_fraction·k⌋`` and ``k_h = k − k_r``.
    group_reduce:
        GQA reduction of the probabilities over the query heads of a KV head: ``"sum"`` (default) or
        ``"mean"`` (same ranking).
    normalize:
        Rank by the accumulated score divided by the number of queries that saw the key (kvpress
        ``ObservedAttentionPress``); the raw sum (official) when ``False``.

    Notes
    -----
    Deviations: scores are kept per sample (the official code sums over the batch) and per KV head
    (official code is MHA); if ``k_h + k_r`` would be 0 we keep one recent entry; ties go to the lower index;
    the cache is compacted (reallocated) on eviction instead of reusing the evicted slot; a composition must
    run ``h2o`` first (its prefill scores need the uncompacted prompt cache). Under MPC (``ctx.xp.secure``)
    both hooks run in :mod:`mpckv.protocols.h2o_secure` (secret scores and picks, oblivious eviction;
    ``normalize=False`` only).
    """

    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    recent_fraction: float = 0.5
    group_reduce: str = "sum"
    normalize: bool = False

    family = "eviction"
    paper = "Zhang et al., NeurIPS 2023 (arXiv 2306.14048)"
    secure = "yes"
    needs_decode_probs = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("heavy_ratio", "recent_ratio", "recent_fraction"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int | float) or not 0.0 <= val <= 1.0:
                raise ConfigError(f"h2o: {name} must be a number in [0, 1], got {val!r}")
        check_choice("h2o", "group_reduce", self.group_reduce, ("sum", "mean"))

    # ------------------------------------------------------------------ budgets
    def split(self, prompt_len: int, layer: int = 0, head: int = 0) -> tuple[int, int]:
        """``(k, k_r)`` — total kept entries and recent entries for a prompt of ``prompt_len`` tokens."""
        if self._budget is None:
            heavy = math.floor(self.heavy_ratio * prompt_len + 1e-9)
            recent = math.floor(self.recent_ratio * prompt_len + 1e-9)
            if heavy + recent == 0:
                recent = 1
            return heavy + recent, recent
        k = max(1, budget_entry_tokens(self._budget, prompt_len, layer, head))
        return k, min(k, math.floor(self.recent_fraction * k + 1e-9))

    def _rank(self, cache: LayerCache) -> torch.Tensor:
        n = cache.max_length
        score = cache.meta[SCORE][:, :, :n]
        if not self.normalize:
            return score
        return score / cache.meta[COUNT][:, :, :n].clamp_min(1.0)

    def _evict(self, ctx: PrefillContext | DecodeContext) -> None:
        cache = ctx.cache
        k, recent = ctx.state["k"], ctx.state["recent"]
        if bool((cache.lengths <= k).all()):
            return
        col = torch.arange(cache.max_length, device=k.device)
        forced = col >= (cache.lengths - recent)[..., None]
        keep_topk(cache, self._rank(cache), k, forced)

    # ------------------------------------------------------------------ hooks
    def on_prefill(self, ctx: PrefillContext) -> None:
        if ctx.xp is not None and ctx.xp.secure:  # secret scores, oblivious compaction
            _secure().on_prefill(self, ctx)
            return
        cache = ctx.cache
        splits = [
            [self.split(int(n), ctx.layer, h) for h in range(cache.kv_heads)]
            for n in ctx.prompt_lengths.tolist()
        ]
        both = torch.tensor(splits, dtype=torch.long, device=cache.lengths.device)  # [B, Hk, 2]
        ctx.state["k"], ctx.state["recent"] = both[..., 0].contiguous(), both[..., 1].contiguous()
        # column sums of all prompt queries: the window scorer with the window = the whole prompt
        scores = all_query_votes(ctx, self.group_reduce)
        n = scores.shape[-1]
        cache.add_meta(SCORE)[:, :, :n] = scores
        if self.normalize:
            col = torch.arange(n, device=scores.device)
            cache.add_meta(COUNT)[:, :, :n] = (cache.lengths[..., None] - col).clamp_min(0).float()
        self._evict(ctx)

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        if ctx.xp is not None and ctx.xp.secure:  # secret scores, oblivious one-entry eviction
            _secure().after_attention(self, ctx, probs)
            return
        if probs is None:
            raise ConfigError("h2o needs the decode attention probabilities (needs_decode_probs)")
        cache = ctx.cache
        n = probs.shape[-1]
        cache.meta[SCORE][:, :, :n] += reduce_group(probs.float(), cache.kv_heads, self.group_reduce)
        if self.normalize:
            cache.meta[COUNT][:, :, :n] += cache.valid()[:, :, :n].float()
        self._evict(ctx)


def _secure() -> Any:
    """The secure twin, imported only under MPC (plaintext never imports the protocols package)."""
    return importlib.import_module("mpckv.protocols.h2o_secure")
