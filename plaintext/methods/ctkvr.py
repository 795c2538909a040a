"""CTkvr — centroid-then-token retrieval with a query-centroid inverted file (qcIVF).

Lu, Lin, Wu, Yao, Yang, Li, Chu, Xu, Qi, Chen. *CTkvr: KV Cache Retrieval for Long-Context LLMs via
Centroid then Token Indexing.* arXiv 2512.15550 (no public code; details partly reconstructed, see
``shared/methods/ctkvr.md``).

Post-RoPE queries at nearby positions are similar, and similar queries share most of their top keys. At
prefill the last ``C`` prompt queries become *centroids*; for each, its ``ρ`` highest-attention keys
(softmax rows of the causal attention, aggregated over the GQA group by max) form a posting list. At
decode the query picks its ``n_probe`` nearest centroids per KV head (stage 1), and exact ``q·k`` is
computed only on the union of their posting lists, the sink and recent-window tokens and every token
generated after the prefill (stage 2); the best ``budget`` of those are attended.

Deviations / choices (the paper's settings are unverified; the card's suggested defaults are used):

* ``C = 64`` centroids = the last 64 prompt queries of every query head (no clustering); posting lists
  are per KV head, ``ρ = max(rho_min, ceil(rho_ratio · prompt length))`` (default 0.1 N), capped at N.
* Stage 1: cosine similarity of each query head to the centroids of the same head, averaged over the
  group; stage 2: ``max`` over the group of ``q·k`` (``group_reduce``).
* Sinks (4) and the recent window (64), each capped at ``budget // 4``, are forced into the selection;
  generated tokens are candidates, not forced.
* No offloading: K/V stay in the cache; the index lives in ``ctx.state``. When the cache was compacted
  after the index was built (a composition such as ``snapkv+ctkvr`` evicting later), the posting lists
  are stale and the step falls back to exact top-k over the whole cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from mpckv.kernels._common import reduce_groups
from mpckv.kernels.sparse_attention import gather_rows
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection
from mpckv.plaintext.methods.selection_parts import (
    forced_sizes,
    head_scores,
    row_tokens,
    uniform_length,
    union_ids,
)
from mpckv.plaintext.methods.topk import select_topk, topk_ascending
from mpckv.registry import register_method


@register_method("ctkvr")
@dataclass(kw_only=True)
class CTkvr(KVMethod):
    """Prompt-end query centroids with top-ρ posting lists, exact refinement at decode (Lu et al. 2025).

    Parameters
    ----------
    budget:
        Tokens attended per step and KV head (ratio of the current length, count, per layer / head),
        sinks and window included. Default 2048.
    centroids:
        ``C``: the last ``C`` prompt queries are the centroids.
    rho_ratio, rho_min:
        Posting-list length ``ρ = min(N, max(rho_min, ceil(rho_ratio · N)))`` for a prompt of ``N``.
    n_probe:
        Centroids probed per KV head at decode.
    sinks, window:
        Forced initial / recent tokens (each at most ``budget // 4``).
    group_reduce:
        Stage-2 aggregation of ``q·k`` over the GQA group: ``"max"``, ``"mean"`` or ``"sum"``.
    """

    centroids: int = field(default=64, metadata={"min": 1})
    rho_ratio: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    rho_min: int = field(default=64, metadata={"min": 1})
    n_probe: int = field(default=2, metadata={"min": 1})
    sinks: int = field(default=4, metadata={"min": 0})
    window: int = field(default=64, metadata={"min": 0})
    group_reduce: Literal["max", "mean", "sum"] = "max"

    family = "selection"
    paper = "Lu et al., arXiv 2512.15550"
    secure = "planned"
    secure_note = (
        "stage 1 is cheap; stage 2 needs a secret gather of the posting lists unless ids are revealed"
    )
    default_budget = 2048

    # ------------------------------------------------------------------ index (prefill)
    def rho(self, n: int) -> int:
        """Posting-list length for a prompt of ``n`` tokens."""
        return min(n, max(self.rho_min, math.ceil(self.rho_ratio * n)))

    def on_prefill(self, ctx: PrefillContext) -> None:
        """Build the qcIVF index: unit centroids ``[B, H, C, d]`` and posting lists ``[B, Hk, C, ρ]``."""
        cache, q = ctx.cache, ctx.q
        b, h, t, d = q.shape
        hk, g, c = cache.kv_heads, h // cache.kv_heads, self.centroids
        dev = q.device
        plen = ctx.prompt_lengths.to(dev)
        qpos = plen[:, None] - c + torch.arange(c, device=dev)  # [B, C] query positions (= row index)
        c_ok = qpos >= 0
        qc = torch.gather(q, 2, qpos.clamp_min(0)[:, None, :, None].expand(b, h, c, d)).float()
        keys, lengths = cache.keys(), cache.lengths
        kpos = cache.positions()  # [B, Hk, L]
        n = keys.shape[2]
        rho_rows = torch.tensor([self.rho(int(x)) for x in plen.tolist()], device=dev)
        rho_max = int(rho_rows.max()) if b else 0
        post = torch.zeros(b, hk, c, rho_max, dtype=torch.long, device=dev)
        post_ok = torch.zeros(b, hk, c, rho_max, dtype=torch.bool, device=dev)
        col = torch.arange(n, device=dev)
        for kv in range(hk):  # prefill only: one KV head at a time bounds the [B, G, C, N] score tensor
            s = qc[:, kv * g : (kv + 1) * g] @ keys[:, kv].float().transpose(-1, -2)[:, None]
            visible = (col < lengths[:, kv, None])[:, None, :] & (kpos[:, kv, None, :] <= qpos[..., None])
            visible = visible & c_ok[..., None]  # [B, C, N]
            s = s.mul_(ctx.scale).masked_fill_(~visible[:, None], float("-inf"))
            p = torch.nan_to_num_(torch.softmax(s, dim=-1), nan=0.0).amax(dim=1)  # [B, C, N]
            idx, ok = select_topk(p, rho_rows[:, None].expand(b, c), invalid=~visible)
            w = idx.shape[-1]
            post[:, kv, :, :w], post_ok[:, kv, :, :w] = idx, ok
        ctx.state.update(
            ctkvr_centroids=F.normalize(qc, dim=-1),
            ctkvr_centroid_ok=c_ok,
            ctkvr_post=post,
            ctkvr_post_ok=post_ok,
            ctkvr_prefill_len=lengths.clone(),
            ctkvr_version=cache.version,
        )

    # ------------------------------------------------------------------ decode
    def probe(self, ctx: DecodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: the ``n_probe`` nearest centroids per KV head, ``(index, valid) [B, Hk, n_probe]``."""
        st = ctx.state
        cen, c_ok = st["ctkvr_centroids"], st["ctkvr_centroid_ok"]
        b, h, d = ctx.q.shape
        hk = ctx.cache.kv_heads
        sim = (cen @ F.normalize(ctx.q.float(), dim=-1)[..., None])[..., 0]  # [B, H, C]
        sim = sim.view(b, hk, h // hk, -1).mean(dim=2)
        bad = ~c_ok[:, None, :].expand_as(sim)
        return select_topk(sim, self.n_probe, invalid=bad)

    def candidates(self, ctx: DecodeContext, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-2 candidates ``Ω`` as ascending, de-duplicated ids ``(index, valid) [B, Hk, M]``.

        The probed posting lists, the sinks, and every entry from ``min(prefill length, n − window)`` on
        (the recent window and all generated tokens).
        """
        st, cache = ctx.state, ctx.cache
        lengths = cache.lengths
        post, post_ok = st["ctkvr_post"], st["ctkvr_post_ok"]
        pidx, pok = self.probe(ctx)
        b, hk, c, rho = post.shape
        sel = pidx[..., None].expand(b, hk, pidx.shape[-1], rho)
        lists = torch.gather(post, 2, sel)
        lists_ok = torch.gather(post_ok, 2, sel) & pok[..., None]
        tail = torch.minimum(st["ctkvr_prefill_len"], lengths - self.window).clamp_min(0)
        zero = torch.zeros_like(lengths)
        return union_ids(cache.max_length, [(lists, lists_ok)], [(zero, sinks), (tail, lengths)])

    def select(self, ctx: DecodeContext) -> Selection | None:
        """Top-``budget`` of the candidates by exact ``q·k`` (sinks and window forced)."""
        cache, lengths = ctx.cache, ctx.cache.lengths
        n = uniform_length(lengths)
        if n is not None and self.resolved_budget.kind != "per_head":
            t = self.resolved_budget.tokens_for(n, ctx.layer, 0)
            if t >= n:
                return None
            tokens = torch.full_like(lengths, t)
        else:
            tokens = row_tokens(self.resolved_budget, lengths, ctx.layer)
            if bool((tokens >= lengths).all()):
                return None
        sinks, window = forced_sizes(tokens, self.sinks, self.window)
        st = ctx.state
        if "ctkvr_post" in st and st.get("ctkvr_version") == cache.version:
            cand, cand_ok = self.candidates(ctx, sinks)
        else:  # no (or a stale) index: every live entry is a candidate
            cand = torch.arange(cache.max_length, device=lengths.device).expand(*lengths.shape, -1)
            cand_ok = cand < lengths[..., None]
        keys = gather_rows(cache.keys(), cand)
        s = reduce_groups(head_scores(ctx.q, keys, ctx.scale), self.group_reduce, dim=2)
        forced = cand_ok & ((cand < sinks[..., None]) | (cand >= (lengths - window)[..., None]))
        k = torch.minimum(tokens, lengths)
        kk = int(k.flatten()[0])
        if bool((k == kk).all()) and kk <= int(cand_ok.sum(-1).min()):
            # one k for every row and enough candidates everywhere: mask scores, no stable sort
            s = s.masked_fill(forced, float("inf")).masked_fill_(~cand_ok, float("-inf"))
            cols = topk_ascending(s, kk)
            ok = torch.ones_like(cols, dtype=torch.bool)
        else:
            cols, ok = select_topk(s, k, forced=forced, invalid=~cand_ok)
        index = torch.gather(cand, 2, cols)
        return Selection(index=torch.where(ok, index, torch.zeros_like(index)), valid=ok)
