"""SnapKV — observation-window voting with 1-D pooling, per KV head, once at the end of prefill.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen. *SnapKV: LLM Knows What You are Looking for
Before Generation.* NeurIPS 2024, arXiv 2404.14469 (official code FasterDecoding/SnapKV; kvpress
``SnapKVPress``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import (
    GROUP_REDUCES,
    POOLINGS,
    check_choice,
    prompt_capacities,
    snapkv_compress,
)
from mpckv.registry import register_method


@register_method("snapkv")
@dataclass(kw_only=True)
class SnapKV(KVMethod):
    """Keep the observation window plus the prefix tokens it votes for (window column sums, pooled).

    For each (sample, KV head) with prompt length ``N`` and capacity ``C`` (from the budget, window
    included): if ``N ≤ C`` the cache is untouched; otherwise the last ``w`` prompt queries' fp32 softmax
    over all ``N`` keys is summed per key, pooled along tokens (stride 1, padding ``kernel_size // 2``),
    reduced over the GQA group, and the top ``C − w`` prefix tokens plus the ``w`` window tokens form the
    new cache (original positions kept, decode appends only).

    Parameters
    ----------
    window:
        Observation window ``w`` (paper/LongBench: 32); always kept.
    kernel_size:
        Odd pooling width (LongBench configs: 7; the official code default is 5 with avgpool).
    pooling:
        ``"max"`` (LongBench configs) or ``"avg"`` (zero padding counted, like ``avg_pool1d`` with
        ``count_include_pad=True``).
    group_reduce:
        GQA reduction of the pooled votes over the query heads of a KV head: ``"mean"`` (kvpress),
        ``"sum"`` or ``"max"``.
    budget:
        Capacity ``C`` per (sample, KV head), window included: a token count, a ratio of the prompt length,
        or per-layer / per-head lists. Default 2048 tokens (official ``init_snapkv``).

    Notes
    -----
    Deviations from the official code: (1) GQA — the official code ``repeat_kv``'s and stores per *query*
    head (cache × G); we reduce the pooled votes over the group (kvpress order: pool per query head, then
    reduce) and store per KV head. (2) ``N ≤ C`` keeps everything (official: ``N < C``; same result).
    (3) ``C < w`` shrinks the kept window to the last ``C`` tokens instead of failing. (4) Ragged batches:
    each sample uses its own last ``w`` tokens and its own ``C`` (ratio budgets are per sample). (5) Ties go
    to the lower index and kept entries stay in ascending position order. (6) The observation window is
    always the last ``w`` prompt tokens (no separately supplied question). (7) Under MPC
    (``ctx.xp.secure``) the eviction runs in :mod:`mpckv.protocols.snapkv_secure`: secret votes and
    picks, oblivious compaction; capacities are public.
    """

    window: int = field(default=32, metadata={"min": 1})
    kernel_size: int = field(default=7, metadata={"min": 1})
    pooling: str = "max"
    group_reduce: str = "mean"

    family = "eviction"
    paper = "Li et al., NeurIPS 2024 (arXiv 2404.14469)"
    secure = "yes"
    default_budget = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"{self.name}: window must be >= 1, got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"{self.name}: kernel_size must be odd and >= 1, got {self.kernel_size}")
        check_choice(self.name, "pooling", self.pooling, POOLINGS)
        check_choice(self.name, "group_reduce", self.group_reduce, GROUP_REDUCES)

    def capacities(self, ctx: PrefillContext) -> torch.Tensor:
        """Capacity ``[B, Hk]`` (window included) of this layer for every sample and KV head."""
        return prompt_capacities(ctx, self.resolved_budget.tokens_for)

    def on_prefill(self, ctx: PrefillContext) -> None:
        caps = self.capacities(ctx)
        ctx.state["caps"] = caps
        if ctx.xp is not None and ctx.xp.secure:  # secret votes, oblivious compaction
            _secure().snapkv_compress(self, ctx, caps)
            return
        snapkv_compress(ctx, caps, self.window, self.kernel_size, self.pooling, self.group_reduce)


def _secure() -> Any:
    """The secure twin, imported only under MPC (plaintext never imports the protocols package)."""
    return importlib.import_module("mpckv.protocols.snapkv_secure")
