"""KVMerger — merge runs of consecutive similar keys with Gaussian-kernel weights around a pivot.

Wang, Jin, Yu, Zhang. *Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context
Tasks.* arXiv 2407.08454, 2024 (no official code was found; see the card's unverified parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpckv.plaintext.methods.base import KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import GROUP_REDUCES, check_choice, prompt_capacities, window_votes
from mpckv.plaintext.methods.topk import select_topk
from mpckv.plaintext.storage.merge import adjacent_cosine, merge_runs, merge_set_ids
from mpckv.plaintext.storage.ragged_cache import RaggedCache
from mpckv.registry import register_method


@register_method("kvmerger")
@dataclass(kw_only=True)
class KVMerger(KVMethod):
    """Collapse every maximal run of consecutive prompt tokens whose adjacent keys have cosine similarity
    ``≥ threshold`` into one entry, then evict by score if a row is still over its budget.

    Per (sample, KV head) row with ``N`` entries and capacity ``C``: rows with ``N ≤ C`` are untouched.
    Otherwise the last ``window`` tokens are protected (never merged, always kept); the other tokens are cut
    into merging sets (:func:`~mpckv.plaintext.storage.merge.merge_set_ids`, the card's ``adjacent``
    criterion on the stored post-RoPE keys); each set becomes ``k* = Σ w_i k_i``, ``v* = Σ w_i v_i`` with
    ``w_i ∝ exp(−‖k_p − k_i‖² / 2σ²)`` around the pivot ``p`` (the set's most attended token by SnapKV's
    window votes), stored at the pivot's slot and RoPE position; the set's score is the sum of its
    members'. If more than ``C`` entries remain, the lowest-scoring non-window ones are evicted (H2O rule).
    The cache is compacted: merged-away entries free memory.

    Parameters
    ----------
    threshold:
        Cosine threshold ε (model-specific in the paper; 0.8 is our uncalibrated default). ``> 1``
        disables merging (pure eviction by the window votes).
    sigma:
        Fixed Gaussian σ; ``0`` (default) uses the per-set ``σ² = mean_{i∈S} ‖k_p − k_i‖²``.
    window:
        Observation window (the last queries whose votes score the tokens); also the protected recent set.
    group_reduce:
        GQA reduction of the votes over a KV head's query heads (the card: ``"sum"``).
    ragged:
        Store the merged rows without padding (:class:`~mpckv.plaintext.storage.ragged_cache.RaggedCache`;
        merging leaves every head a different length); ``False`` compacts the dense cache (padded to the
        longest head of the layer).
    budget:
        Capacity ``C`` per (sample, KV head), window included (ratio of the prompt or tokens; default 50 %).

    Notes
    -----
    Deviations / choices for the card's unverified parts: adjacent-similarity sets (not anchor), the
    per-set mean σ rule, the same weights for values, merging only rows over budget (so a full budget is
    dense), no ``+log|S|`` logit bias, decode appends only; a composition must run ``kvmerger`` first (its
    votes need the uncompacted prompt cache).
    """

    threshold: float = 0.8
    sigma: float = field(default=0.0, metadata={"min": 0.0})
    window: int = field(default=32, metadata={"min": 1})
    group_reduce: str = "sum"
    ragged: bool = True

    family = "merging"
    paper = "Wang et al., arXiv 2407.08454 (2024)"
    secure = "planned"
    secure_note = "secret run boundaries give data-dependent lengths: pad to the budget, compact obliviously"
    default_budget = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "group_reduce", self.group_reduce, GROUP_REDUCES)

    def on_prefill(self, ctx: PrefillContext) -> None:
        cache = ctx.cache
        n = cache.lengths
        caps = prompt_capacities(ctx, self.resolved_budget.tokens_for).to(n.device)
        if bool((n <= caps).all()):
            return
        b, hk, length = n.shape[0], n.shape[1], cache.max_length
        votes = window_votes(ctx, self.window, self.group_reduce)  # [B, Hk, L]
        col = torch.arange(length, device=n.device)
        live = col < n[..., None]
        window = col >= (n - torch.minimum(caps, torch.full_like(caps, self.window)))[..., None]
        over = (n > caps)[..., None]
        candidate = live & ~window & over  # rows within budget: every entry a singleton
        keys, values = cache.keys(), cache.values()
        sim = adjacent_cosine(keys).reshape(b * hk, max(length - 1, 0))
        set_id = merge_set_ids(sim, candidate.reshape(b * hk, length), self.threshold)
        res = merge_runs(
            keys.reshape(b * hk, length, -1), values.reshape(b * hk, length, -1), votes, set_id, self.sigma
        )
        merged = res.sizes > 1
        flat = torch.arange(b * hk * length, device=n.device)
        is_pivot = (res.pivot[res.set_id] == flat).view(b, hk, length) & live
        write = (is_pivot & merged[res.set_id].view(b, hk, length))[..., None]
        if bool(write.any()):  # merged sets only: singletons stay bit-exact
            shape = (b, hk, length, -1)
            cache.k[:, :, :length] = torch.where(
                write, res.keys[res.set_id].view(shape).to(cache.dtype), keys
            )
            cache.v[:, :, :length] = torch.where(
                write, res.values[res.set_id].view(shape).to(cache.dtype), values
            )
        score = res.scores[res.set_id].view(b, hk, length)
        index, valid = select_topk(score, caps, window & live, ~is_pivot)
        ctx.state["merged_sets"] = int(merged.sum())
        if self.ragged:
            ctx.replace_cache(RaggedCache.from_selection(cache, index, valid))
        else:
            cache.compact(index, valid)
