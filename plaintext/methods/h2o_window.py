"""The prefill-only "H2O" baseline of SnapKV-family papers: window column sums, no pooling, top-k.

What KVCache-Factory / PyramidKV / ThinK / WindowKV report as "H2O" in their LongBench tables: SnapKV
without pooling, applied once at the end of prefill, with no decode-time eviction. The heavy-hitter idea is
from Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
NeurIPS 2023, arXiv 2306.14048; the decode-time algorithm of that paper is :mod:`.h2o`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import (
    GROUP_REDUCES,
    check_choice,
    prompt_capacities,
    snapkv_compress,
    window_votes,
)
from mpckv.registry import register_method


@register_method("h2o_window")
@dataclass(kw_only=True)
class H2OWindow(KVMethod):
    """Keep the last ``w`` prompt tokens plus the top ``C − w`` prefix tokens by window column sums.

    Parameters
    ----------
    window:
        Observation (and always-kept) window ``w``; default 32.
    group_reduce:
        GQA reduction of the votes over the query heads of a KV head (``"mean"`` default).
    budget:
        Capacity ``C`` per (sample, KV head), window included (token count, ratio of the prompt, per layer
        or per head). Default 2048 tokens.

    Notes
    -----
    Deviations: the SnapKV-family repos ``repeat_kv`` and select per query head; we reduce over the group
    and store per KV head. ``N ≤ C`` is untouched; ``C < w`` keeps the last ``C`` tokens. With
    ``window ≥ N`` the votes are the prefill column sums of all prompt queries, i.e. the prefill scores of
    :class:`~mpckv.plaintext.methods.h2o.H2O` (``normalize=False``). Under MPC the eviction runs in
    :mod:`mpckv.protocols.snapkv_secure` (secret votes and picks, oblivious compaction).
    """

    window: int = field(default=32, metadata={"min": 1})
    group_reduce: str = "mean"

    family = "eviction"
    paper = "Zhang et al., NeurIPS 2023 (arXiv 2306.14048) — SnapKV-family prefill baseline"
    secure = "yes"
    default_budget = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"h2o_window: window must be >= 1, got {self.window}")
        check_choice("h2o_window", "group_reduce", self.group_reduce, GROUP_REDUCES)

    def scores(self, ctx: PrefillContext) -> torch.Tensor:
        """Unpooled window votes ``[B, Hk, L]`` (the ranking this method uses on the prefix)."""
        return window_votes(ctx, self.window, self.group_reduce)

    def on_prefill(self, ctx: PrefillContext) -> None:
        caps = prompt_capacities(ctx, self.resolved_budget.tokens_for)
        ctx.state["caps"] = caps
        if ctx.xp is not None and ctx.xp.secure:  # secret votes, oblivious compaction (as SnapKV)
            importlib.import_module("mpckv.protocols.snapkv_secure").snapkv_compress(self, ctx, caps)
            return
        snapkv_compress(ctx, caps, self.window, 1, "max", self.group_reduce)
