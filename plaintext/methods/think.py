"""ThinK — query-driven pruning of key channels, once after prefill (after any token eviction).

Xu, Jie, Dong, Wang, Lu, Zhou, Saha, Xiong, Sahoo. *ThinK: Thinner Key Cache by Query-Driven Pruning.*
ICLR 2025, arXiv 2407.21018 (official code SalesforceAIResearch/ThinK; kvpress ``ThinKPress``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpckv.plaintext.methods.base import KVMethod, PrefillContext
from mpckv.plaintext.methods.topk import select_topk
from mpckv.plaintext.storage.pruned_cache import PrunedKeyCache
from mpckv.registry import register_method


def observation_queries(q: torch.Tensor, prompt_lengths: torch.Tensor, window: int) -> torch.Tensor:
    """The last ``min(window, T)`` prompt queries of every sample, ``[B, H, w, d]`` (a sample shorter than
    ``w`` repeats its first query; the channel score is a mean, so this only reweights)."""
    b, h, t, d = q.shape
    w = max(1, min(window, t))
    n = prompt_lengths.to(q.device)
    idx = (n[:, None] - w + torch.arange(w, device=q.device)).clamp_min(0)
    return torch.gather(q, 2, idx[:, None, :, None].expand(b, h, w, d))


def channel_scores(q_obs: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ThinK's per-channel score ``[B, Hk, d]``: ``mean_{g,t} q[g,t,c]² · mean_j k[j,c]²``.

    ``q_obs [B, H, w, d]`` (the GQA group's query heads averaged, as kvpress), ``keys [B, Hk, L, d]`` with
    live ``lengths [B, Hk]`` (the mean runs over each row's live entries only).
    """
    b, hk, length, d = keys.shape
    g = q_obs.shape[1] // hk
    q2 = q_obs.float().pow(2).view(b, hk, g, -1, d).mean(dim=(2, 3))
    live = (torch.arange(length, device=keys.device) < lengths[..., None])[..., None]
    k2 = torch.where(live, keys.float().pow(2), 0.0).sum(2) / lengths.clamp_min(1)[..., None]
    return q2 * k2


@register_method("think")
@dataclass(kw_only=True)
class ThinK(KVMethod):
    """Store only the ``T = d − ⌊λ·d⌋`` key channels per (sequence, KV head) that contribute most to the
    observation queries' logits; the most recent entries and every decode token keep full keys.

    After the layer's prefill (and after any earlier part of a composition evicted tokens, e.g.
    ``snapkv+think``), every channel ``c`` of a KV head is scored by ``mean_{g,t} q_obs[g,t,c]² ·
    mean_j k[j,c]²`` over the last ``obs_window`` prompt queries of the head's GQA group and the row's live
    keys (the squared surrogate of ``‖Q_c‖·‖K_c‖``). The top ``T`` channels (ties to the lower index) are
    kept for all entries but the last ``r`` of the row; those and all decode tokens stay full width. The
    layer's cache becomes a :class:`~mpckv.plaintext.storage.pruned_cache.PrunedKeyCache`: pruned keys
    ``[B, Hk, L − r, T]`` + channel index, so the bytes really fall; decode attention gathers ``q[chan]``
    for the pruned part and takes one softmax over both parts. Values are untouched.

    Parameters
    ----------
    ratio:
        λ, the fraction of key channels pruned (official ``pruning_ratio`` 0.4). ``0`` is dense.
    obs_window:
        Observation queries (official: the last 32, hard-coded).
    budget:
        ``r``, the entries per (sequence, KV head) that keep full-width keys (official ``recent_size`` 32,
        the default): a token count or a ratio of the entries present when ThinK runs. A budget that
        covers every entry leaves the cache dense.
    recent:
        ``> 0``: ``r`` in tokens, overriding the budget (a composition gives all parts one budget, so
        ``snapkv+think`` with ``recent=32`` is the official setting: SnapKV at the budget, ``r = 32``).

    Notes
    -----
    Deviations: (1) one channel set per KV head (GQA: query statistics averaged over the group, kvpress)
    instead of the official ``repeat_kv`` per query head; (2) pruned keys are stored compactly and attended
    with a gathered query (the official code zero-fills and runs dense attention, kvpress zero-fills every
    token): same logits, real memory savings; (3) the budget is the full-width window ``r`` (ThinK has no
    token budget of its own; a ratio applies to what is present, so ``snapkv+think`` at 0.25 keeps the
    newest 25 % of SnapKV's entries full width); (4) per-sample observation windows in ragged batches.
    """

    ratio: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})
    obs_window: int = field(default=32, metadata={"min": 1})
    recent: int = field(default=0, metadata={"min": 0})

    family = "channel pruning"
    paper = "Xu et al., ICLR 2025 (arXiv 2407.21018)"
    secure = "planned"
    secure_note = (
        "scores are sums of squares and a top-k over d channels; the channel gather is not secure yet"
    )
    default_budget = 32

    def kept_channels(self, head_dim: int) -> int:
        """``T = d − ⌊λ·d⌋`` (at least one channel)."""
        return max(1, head_dim - int(self.ratio * head_dim))

    def channels(self, ctx: PrefillContext) -> torch.Tensor:
        """Kept channel index ``[B, Hk, T]`` (ascending) for this layer's cache."""
        cache = ctx.cache
        q_obs = observation_queries(ctx.q, ctx.prompt_lengths, self.obs_window)
        scores = channel_scores(q_obs, cache.keys(), cache.lengths)
        index, _ = select_topk(scores, self.kept_channels(cache.head_dim))
        return index

    def on_prefill(self, ctx: PrefillContext) -> None:
        cache = ctx.cache
        if self.kept_channels(cache.head_dim) >= cache.head_dim:
            return  # λ = 0: dense, bit-exact
        if self.recent > 0:
            recent = torch.full_like(cache.lengths, self.recent)
        else:
            tokens_for = self.resolved_budget.tokens_for
            present = cache.lengths.tolist()
            recent = torch.tensor(
                [[tokens_for(int(n), ctx.layer, h) for h, n in enumerate(row)] for row in present],
                dtype=torch.long,
                device=cache.lengths.device,
            ).reshape(cache.lengths.shape)
        n_old = (cache.lengths - recent).clamp_min(0)
        if not bool((n_old > 0).any()):
            return  # every entry is in the full-width window
        ctx.replace_cache(PrunedKeyCache.from_cache(cache, self.channels(ctx), n_old))
