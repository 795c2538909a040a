"""WindowKV — task-adaptive selection of whole windows of consecutive tokens, shared inside layer groups.

Zuo, Wei, Zhang, Liu, Lu, Song. *WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for
Efficient LLM Inference.* arXiv 2503.17922, 2025 (official code optim996/WindowKV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpckv.config import ModelConfig
from mpckv.errors import BudgetError, ConfigError
from mpckv.plaintext.methods.allocators import budget_entry_tokens
from mpckv.plaintext.methods.base import KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import check_choice, keep_topk, window_votes
from mpckv.plaintext.methods.topk import select_topk
from mpckv.registry import register_method

TASKS = {"qa": ("max", 32), "other": ("average", 16)}
KEEP = "windowkv_keep"


def group_budgets(c: int, num_layers: int, group_size: int, beta: float, review: int) -> list[int]:
    """Review budget (suffix excluded) of every group: arithmetic from ``first`` down to ``last``.

    ``last = ⌊C·g/β⌋``, ``first = 2C − last``, ``step = ⌊(first − last)/(n_g − 1)⌋``; group ``i`` gets
    ``first − i·step`` and the last group ``last``. When ``first`` exceeds the review length it is clamped
    to it and ``last = 2C − first`` (the mean stays ``C``), so ``C ≥ review`` compresses nothing.
    """
    n_g = math.ceil(num_layers / group_size)
    if n_g == 1:
        return [c]
    last = math.floor(c * group_size / beta)
    first = 2 * c - last
    if first > review:
        first, last = review, max(0, 2 * c - review)
    step = (first - last) // (n_g - 1)
    return [first - i * step for i in range(n_g - 1)] + [last]


def window_scores(votes: torch.Tensor, review: torch.Tensor, size: int, strategy: str) -> torch.Tensor:
    """One score per window ``[B, m]`` from per-head votes ``[B, H, N]`` over the review part ``[0, R_b)``.

    ``average``: mean of the votes in the window over heads and tokens. ``max``: per head the mean of the
    top ``size // 2`` votes inside the window (fewer in a short last window), then the mean over heads.
    Windows starting at or beyond ``R_b`` score ``-inf``.
    """
    b, h, n = votes.shape
    m = max(1, math.ceil(int(review.max()) / size)) if review.numel() else 1
    pad = m * size
    v = torch.zeros(b, h, pad, dtype=torch.float32, device=votes.device)
    v[:, :, : min(n, pad)] = votes[:, :, :pad].float()
    col = torch.arange(pad, device=votes.device)
    inside = (col[None, :] < review[:, None]).view(b, 1, m, size)
    v = v.view(b, h, m, size)
    count = inside.sum(-1).float()  # [B, 1, m]
    if strategy == "average":
        per_head = (v * inside).sum(-1) / count.clamp_min(1)
    else:
        top = torch.topk(v.masked_fill(~inside, float("-inf")), max(1, size // 2), dim=-1).values
        finite = torch.isfinite(top)
        per_head = top.masked_fill(~finite, 0.0).sum(-1) / finite.sum(-1).clamp_min(1)
    scores = per_head.mean(1)
    return scores.masked_fill(count[:, 0] == 0, float("-inf"))


@register_method("windowkv")
@dataclass(kw_only=True)
class WindowKV(KVMethod):
    """Keep whole windows of ``window_size`` consecutive prompt tokens plus the observation suffix.

    Layers form groups of ``group_size``; the first layer of each group scores the windows of the review
    part (the prompt minus its last ``s`` tokens) from the attention of the ``s`` suffix queries (summed per
    key, per query head), with the task's reducer, and drops the ``⌈(R − C_g)/W⌉`` lowest windows; the
    other layers of the group keep the same windows (read through ``ctx.all_states``). The selection is
    shared by all KV heads. Group budgets ``C_g`` shrink from bottom to top (:func:`group_budgets`).

    Parameters
    ----------
    task:
        ``"qa"`` (information localisation: ``max`` reducer, suffix 32) or ``"other"`` (aggregation:
        ``average``, suffix 16). The paper picks it with a BERT classifier on the input, a separate
        fine-tuned model that is not released; here it is a request parameter (public metadata).
    strategy, suffix:
        Override the task's reducer (``"max"`` | ``"average"``) or suffix size.
    window_size, group_size, beta:
        ``W`` (paper 8), layers per group ``g`` (paper 8) and pyramid steepness ``β`` (paper 14).
    budget:
        Kept entries per layer on average, suffix included (``C = budget − s``): a token count or a ratio
        of the prompt length.

    Notes
    -----
    Deviations: (1) window scores per sample (official: pooled over the batch); (2) kept windows in
    ascending order (official: score order; attention is order-invariant); (3) the budget includes the
    suffix (paper: ``C`` excludes it) so that rows compare with SnapKV at the same budget; (4) a model
    whose layer count is not a multiple of ``g`` gets a shorter last group (official: no budget);
    (5) the group pyramid is clamped at the review length (as PyramidKV here); (6) ties keep the lower
    window.
    """

    task: str = "qa"
    strategy: str | None = None
    suffix: int | None = None
    window_size: int = 8
    group_size: int = 8
    beta: float = 14.0

    family = "eviction"
    paper = "Zuo et al., arXiv 2503.17922"
    secure = "planned"
    secure_note: ClassVar[str] = (
        "window votes need SnapKV's secure softmax, then a top-k over windows; not built yet"
    )
    default_budget = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("windowkv", "task", self.task, tuple(TASKS))
        if self.strategy is not None:
            check_choice("windowkv", "strategy", self.strategy, ("max", "average"))
        if self.window_size < 1 or self.group_size < 1 or (self.suffix is not None and self.suffix < 1):
            raise ConfigError("windowkv: window_size, group_size and suffix must be >= 1")
        if not self.beta > 0:
            raise ConfigError(f"windowkv: beta must be positive, got {self.beta}")

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        if self._budget is not None and self._budget.kind not in ("ratio", "tokens"):
            raise BudgetError("windowkv takes one ratio or token budget (groups set per-layer budgets)")

    @property
    def reducer(self) -> str:
        return self.strategy or TASKS[self.task][0]

    @property
    def suffix_len(self) -> int:
        return self.suffix or TASKS[self.task][1]

    def review_budget(self, n: int, group: int, num_layers: int) -> int:
        """``C_g`` for a prompt of ``n`` tokens (suffix excluded)."""
        s = min(self.suffix_len, n)
        c = max(0, budget_entry_tokens(self.resolved_budget, n) - s)
        return group_budgets(c, num_layers, self.group_size, self.beta, n - s)[group]

    def on_prefill(self, ctx: PrefillContext) -> None:
        first = (ctx.layer // self.group_size) * self.group_size
        if ctx.layer == first:
            ctx.state[KEEP] = self._select(ctx)
        keep = ctx.all_states[first][KEEP] if ctx.all_states else ctx.state[KEEP]
        ctx.state[KEEP] = keep
        if keep is None:
            return
        cache = ctx.cache
        forced = keep[:, None, : cache.max_length].expand(-1, cache.kv_heads, -1)
        keep_topk(cache, forced.float(), forced.sum(-1), forced)

    def _select(self, ctx: PrefillContext) -> torch.Tensor | None:
        """Token keep mask ``[B, N]`` of this group, or ``None`` when no sample is compressed."""
        n = ctx.prompt_lengths.to(ctx.cache.lengths.device)
        group = ctx.layer // self.group_size
        s = torch.clamp(n, max=self.suffix_len)
        review = n - s
        caps = torch.tensor(
            [self.review_budget(int(x), group, ctx.num_layers) for x in n.tolist()], device=n.device
        )
        if bool((review <= caps).all()):
            return None
        w = self.window_size
        votes = window_votes(ctx, self.suffix_len, per_query_head=True)
        scores = window_scores(votes, review, w, self.reducer)  # [B, m]
        m_b = (review + w - 1) // w
        n_drop = torch.where(review > caps, (review - caps + w - 1) // w, torch.zeros_like(review))
        keep_w = (m_b - n_drop).clamp_min(0)
        invalid = torch.arange(scores.shape[1], device=n.device)[None, :] >= m_b[:, None]
        idx, valid = select_topk(scores, keep_w, None, invalid)
        m = scores.shape[1]
        kept_windows = torch.zeros(scores.shape[0], m + 1, dtype=torch.bool, device=n.device)
        kept_windows.scatter_(1, torch.where(valid, idx, torch.full_like(idx, m)), True)
        kept_windows = kept_windows[:, :m]
        col = torch.arange(ctx.cache.max_length, device=n.device)
        win = (col // w).clamp_max(m - 1)
        in_review = col[None, :] < review[:, None]
        keep = torch.where(in_review, kept_windows[:, win], col[None, :] < n[:, None])
        return keep | (review <= caps)[:, None] & (col[None, :] < n[:, None])
