"""DELTA — dynamic layer-aware token attention: full, Δ-selection and sparse layers.

Entezari Zarch, Gao, Jiang, Annavaram. *DELTA: Dynamic Layer-Aware Token Attention for Efficient
Long-Context Reasoning.* arXiv 2510.09883 (ACL 2026 Findings; code: github.com/hoenza/DELTA).

A few warm-up layers and a few Δ-layers run exact dense attention. Every Δ-layer also turns its attention
probabilities into page scores — ``S[u] = Σ_{t∈u} max_h p[h, t]`` over pages of ``page_size`` tokens —
forces the last ``recent_pages`` pages and keeps the ``K`` best pages. Every layer after a Δ-layer, up to
the next full layer, attends only to those pages (exact softmax over their tokens): the selection is
made once and reused by all heads and several layers.

Deviations / choices (see ``shared/methods/delta.md``):

* **Layer placement.** ``warmup_layers`` / ``delta_layers`` name the layers; ``None`` scales the code's
  28-layer default (warm-up {0, 1}, Δ {2, 14, 22}) to the model: ``w = max(L·2 // 28, 1 if L >= 3)``
  warm-up layers, Δ-layers at ``w``, ``round(L/2)`` and ``round(L·22/28)`` (only the first when
  ``L < 8``), so that every model with two or more layers has sparse layers. Layer 0 is a poor Δ-layer
  (on ``tiny``: passkey 0 % with Δ = {0}, 100 % with Δ = {1} at a 10 % budget), hence one warm-up layer
  from three layers on. The offline calibration (1 − cos of adjacent attention maps)
  is not implemented.
* **Budget.** ``K = max(1, tokens // page_size)`` pages from the token budget of the current length; the
  forced recent pages (at most ``K // 4``, at least the page holding the current token) count towards
  ``K``. ``K >= n_pages`` makes the step dense everywhere.
* **Ties** go to the earlier page (the one top-k, the code's ``−1e−7·u`` bias).
* **Probabilities** come from the engine's dense decode attention (``needs_decode_probs``), not from a
  logit buffer; sparse layers therefore also return their (unused) probabilities.
* **Cache layout.** Sharing the pages of one layer with later layers (and one set with every head) needs
  identical cache layouts; when a composition compacted the cache (``snapkv+delta``) the page set is per
  KV head (max over its group) and a sparse layer whose layout differs from its Δ-layer's attends densely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.kernels.page_bounds import num_valid_pages
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, Selection
from mpckv.plaintext.methods.selection_parts import (
    blocks_to_tokens,
    max_over_heads,
    pool_blocks,
    row_tokens,
    shared_layout,
)
from mpckv.plaintext.methods.topk import select_topk
from mpckv.registry import register_method


def default_layers(num_layers: int) -> tuple[list[int], list[int]]:
    """Warm-up and Δ-layers for a model of ``num_layers`` layers (the code's 28-layer default, scaled)."""
    w = max(1 if num_layers >= 3 else 0, num_layers * 2 // 28)
    deltas = {w}
    if num_layers >= 8:
        deltas |= {round(num_layers * 14 / 28), round(num_layers * 22 / 28)}
    return list(range(w)), sorted(x for x in deltas if x < num_layers)


@register_method("delta")
@dataclass(kw_only=True)
class Delta(KVMethod):
    """Dense warm-up and Δ-layers; sparse layers reuse the latest Δ-layer's top pages (Entezari Zarch et al.).

    Parameters
    ----------
    budget:
        Tokens read per step by sparse layers (ratio of the current length, count, or per layer / head);
        ``K = max(1, tokens // page_size)`` pages. Default 1024 (the code's 64 pages of 16).
    page_size:
        Tokens per page (16).
    recent_pages:
        Last pages always selected (code: 8), at most ``K // 4`` and at least 1.
    warmup_layers, delta_layers:
        Dense layers without / with page selection; ``None`` = scaled default (see the module docstring).
    """

    page_size: int = field(default=16, metadata={"min": 1})
    recent_pages: int = field(default=8, metadata={"min": 1})
    warmup_layers: list[int] | None = None
    delta_layers: list[int] | None = None

    family = "selection"
    paper = "Entezari Zarch et al., arXiv 2510.09883"
    secure = "planned"
    secure_note = "one top-K over N/16 pages per Δ-layer, reused by the sparse layers"
    needs_decode_probs = True
    default_budget = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("warmup_layers", "delta_layers"):
            val = getattr(self, name)
            if val is not None and any(x < 0 for x in val):
                raise ConfigError(f"delta {name} must list layer indices >= 0, got {val}")

    def layers(self, num_layers: int) -> tuple[set[int], list[int]]:
        """``(warm-up layers, sorted Δ-layers)`` for a model of ``num_layers`` layers."""
        warm, deltas = default_layers(num_layers)
        if self.warmup_layers is not None:
            warm = list(self.warmup_layers)
        if self.delta_layers is not None:
            deltas = sorted(self.delta_layers)
        return set(warm), deltas

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        warm, deltas = self.layers(config.num_hidden_layers)
        bad = sorted(x for x in warm | set(deltas) if x >= config.num_hidden_layers)
        if bad:
            raise ConfigError(f"delta: layers {bad} are beyond the model's {config.num_hidden_layers} layers")

    def _role(self, layer: int, num_layers: int) -> tuple[str, int | None]:
        """``("full", None)``, ``("delta", None)`` or ``("sparse", latest Δ-layer before it or None)``."""
        warm, deltas = self.layers(num_layers)
        if layer in warm:
            return "full", None
        if layer in deltas:
            return "delta", None
        before = [x for x in deltas if x < layer]
        return "sparse", (before[-1] if before else None)

    # ------------------------------------------------------------------ Δ-layers: plan
    def page_scores(self, probs: torch.Tensor, kv_heads: int, share: bool) -> torch.Tensor:
        """``S[b, hk, u] = Σ_{t∈u} max_h p[b, h, t]`` ``[B, Hk, n_pages]`` from probs ``[B, H, L]``."""
        return pool_blocks(max_over_heads(probs, kv_heads, share), self.page_size, "sum")

    def plan(self, ctx: DecodeContext, probs: torch.Tensor) -> Selection | None:
        """The page selection of a Δ-layer as token indices, or ``None`` when it covers every page."""
        cache, p = ctx.cache, self.page_size
        lengths = cache.lengths
        n_valid = num_valid_pages(lengths, p)
        tokens = row_tokens(self.resolved_budget, lengths, ctx.layer)
        k_pages = torch.where(tokens >= lengths, n_valid, (tokens // p).clamp_min(1))
        if bool((k_pages >= n_valid).all()):
            return None
        share = shared_layout(cache)
        scores = self.page_scores(probs[..., : cache.max_length], cache.kv_heads, share)
        page = torch.arange(scores.shape[-1], device=scores.device)
        recent = (k_pages // 4).clamp(min=1, max=self.recent_pages)
        invalid = page >= n_valid[..., None]
        forced = (page >= (n_valid - recent)[..., None]) & ~invalid
        pidx, pvalid = select_topk(scores, k_pages, forced=forced, invalid=invalid)
        index, valid = blocks_to_tokens(pidx, pvalid, p, lengths)
        return Selection(index=index, valid=valid)

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        role, _ = self._role(ctx.layer, ctx.num_layers)
        if role != "delta" or probs is None:
            return
        ctx.state["delta_plan"] = (
            ctx.step,
            ctx.cache.version,
            ctx.cache.lengths.clone(),
            self.plan(ctx, probs),
        )

    # ------------------------------------------------------------------ sparse layers: reuse
    def select(self, ctx: DecodeContext) -> Selection | None:
        role, src = self._role(ctx.layer, ctx.num_layers)
        if role != "sparse" or src is None:
            return None
        entry = ctx.all_states[src].get("delta_plan")
        if entry is None:
            return None
        step, version, lengths, sel = entry
        cache = ctx.cache
        same = step == ctx.step and version == 0 == cache.version and torch.equal(lengths, cache.lengths)
        return sel if same else None
