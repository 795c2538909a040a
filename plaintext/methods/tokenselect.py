"""TokenSelect — token-level selection by per-head soft voting, with a Selection Cache.

Wu, Pan, Fu, Wang, Chen, Bai, Wang, Wang, Xiong. *TokenSelect: Efficient Long-Context Inference and
Length Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection.* EMNLP 2025, arXiv 2411.02886
(code: github.com/pzs19/TokenSelect).

At every decode step and layer each cached candidate token gets ``s[h, t] = c · q_h · k_t`` for every
query head; every head's scores become a distribution (softmax over the candidates) and the
distributions are summed over all heads (soft voting), so a single head with a sharp peak is not drowned
by heads with larger raw magnitudes. The ``k`` best voted tokens plus ``n_init`` initial and ``n_local``
recent tokens form one set that every head of the layer attends (exact attention over the set). A
Selection Cache reuses the previous top-k part while the new query stays close (cosine ``>= theta``) to
the query that produced it.

Deviations (see ``shared/methods/tokenselect.md``) — chosen deliberately:

* **Selection Cache on** (``theta = 0.9``), as in the paper; the released ``patch()`` default is off
  (``cache_theta > 1`` switches it off, which is exactly the no-cache method). One hit/miss decision per
  sequence per layer (query flattened over heads); on a hit the forced init/local parts are recomputed for
  the new length and the cached top-k part is kept (its size is not re-fitted to a grown ratio budget).
* **Scores on post-RoPE keys at true positions** (our cache stores keys post-RoPE); the code stores
  pre-RoPE keys and rotates the query to the fixed offset ``n_local`` (``score_rope=fixed_offset``).
* **Original positions** for attention; the paper's compact positions (index inside S, the length
  extrapolation part) are not implemented (the engine's keys are already rotated).
* **Raw q·k in the vote** (``vote_scale = 1``, the code: no ``1/√d``), GQA as ``h // G`` (the kernel's
  ``h % Hk`` is a layout quirk), optional max-pool smoothing ``pool_kernel`` (off by default).
* **Candidate pre-filter (ours, on by default: ``prefilter = 4``).** Exact voting over all N tokens
  reads every key each step, as much K traffic as dense attention (≤ ~1.6× faster on CPU); we first keep
  the ``4·k`` candidate tokens of the pages with the best Quest bound ``relu(q)·kmax + min(q,0)·kmin``
  (max over all heads; bounds updated in place per appended entry) and vote over those only (each head's
  softmax is over the candidates). ``prefilter = 0`` is the exact method of the card (the card's MPC
  notes suggest the same pre-filter).
* **Budget.** The token budget ``T`` counts everything read: ``n_init`` and ``n_local`` are each capped at
  ``T // 4`` and ``k = T − n_init − n_local``; ``T >= N`` reads every entry (dense).
* **Decode only.** Prefill is dense (the engine's prefill); the paper also selects inside prefill chunks.
* **One set per sequence** only when all KV heads share the cache layout (a never-compacted cache); after
  an eviction method compacted heads differently (``snapkv+tokenselect``) each KV head votes over its
  own group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mpckv.kernels.sparse_attention import gather_rows
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, Selection
from mpckv.plaintext.methods.selection_parts import (
    assemble,
    forced_sizes,
    forced_split,
    head_scores,
    page_bounds,
    query_reuse,
    row_tokens,
    shared_layout,
    soft_vote,
    uniform_length,
)
from mpckv.plaintext.methods.topk import select_topk, topk_ascending
from mpckv.registry import register_method


@register_method("tokenselect")
@dataclass(kw_only=True)
class TokenSelect(KVMethod):
    """Per-head soft voting over ``q·k``, one top-k token set per layer, Selection Cache (Wu et al. 2025).

    Parameters
    ----------
    budget:
        Tokens read per step and sequence (ratio of the current length, a count, or per layer / head),
        the forced init and local tokens included. Default 2688 (the paper: 128 + 2048 + 512).
    n_init, n_local:
        Initial and most recent tokens always attended (paper: 128 / 512), each at most ``budget // 4``.
    cache_theta:
        Selection-Cache cosine threshold (paper constant 0.9); ``> 1`` disables the cache.
    vote_scale:
        Multiplier of ``q·k`` inside the per-head softmax (code: 1.0, no ``1/√d``).
    pool_kernel:
        Max-pool width applied to the vote before top-k (0 or 1 = off; the paper sets it per dataset).
    prefilter:
        Candidate pre-filter (ours, off = 0): only the ``ceil(prefilter · k / prefilter_page)`` pages of
        ``prefilter_page`` tokens with the best Quest upper bound (max over heads) are scored exactly.
    prefilter_page:
        Page size of the pre-filter's key bounds.
    """

    n_init: int = field(default=128, metadata={"min": 0})
    n_local: int = field(default=512, metadata={"min": 0})
    cache_theta: float = field(default=0.9, metadata={"min": -1.0})
    vote_scale: float = field(default=1.0, metadata={"min": 0.0})
    pool_kernel: int = field(default=0, metadata={"min": 0})
    prefilter: float = field(default=4.0, metadata={"min": 0.0})
    prefilter_page: int = field(default=16, metadata={"min": 1})

    family = "selection"
    paper = "Wu et al., EMNLP 2025 (arXiv 2411.02886)"
    secure = "planned"
    secure_note = "softmax over N per head and top-k over N each step; the cache hit bit would leak"
    default_budget = 2688

    # ------------------------------------------------------------------ scoring
    def vote(self, ctx: DecodeContext, lo: int, hi: int, share: bool) -> torch.Tensor:
        """Soft votes ``[B, Hk, hi − lo]`` of cache entries ``[lo, hi)`` (every row at least ``hi`` long)."""
        keys = ctx.cache.keys()[:, :, lo:hi]
        v = soft_vote(head_scores(ctx.q, keys, self.vote_scale), share)
        return self._smooth(v)

    def _smooth(self, v: torch.Tensor) -> torch.Tensor:
        kk = self.pool_kernel
        if kk <= 1:
            return v
        b, hk, n = v.shape
        left = (kk - 1) // 2
        padded = F.pad(v.reshape(b * hk, 1, n), (left, kk - 1 - left), value=float("-inf"))
        return F.max_pool1d(padded, kk, stride=1).view(b, hk, n)

    # ------------------------------------------------------------------ selection
    def select(self, ctx: DecodeContext) -> Selection | None:
        """The selected entries of every row; ``None`` (dense) when the budget covers every row."""
        lengths = ctx.cache.lengths
        n = uniform_length(lengths)
        if n is not None and self.resolved_budget.kind != "per_head":
            t = self.resolved_budget.tokens_for(n, ctx.layer, 0)
            if t >= n:
                return None
            ni, nl = forced_split(t, self.n_init, self.n_local)
            tokens = torch.full_like(lengths, t)
            sinks, window = torch.full_like(lengths, ni), torch.full_like(lengths, nl)
        else:
            tokens = row_tokens(self.resolved_budget, lengths, ctx.layer)
            if bool((tokens >= lengths).all()):
                return None
            sinks, window = forced_sizes(tokens, self.n_init, self.n_local)
        k = tokens - sinks - window
        share = shared_layout(ctx.cache)
        top, top_ok = self._top_part(ctx, n, sinks, window, k, share)
        index, valid = assemble(lengths, sinks, window, top, top_ok)
        dense = tokens >= lengths  # rows whose budget covers them read everything
        if bool(dense.any()):
            full = torch.arange(ctx.cache.max_length, device=lengths.device).expand(*lengths.shape, -1)
            index, valid = _merge_dense(index, valid, full, full < lengths[..., None], dense)
        return Selection(index=index, valid=valid)

    def _top_part(
        self, ctx: DecodeContext, n: int | None, sinks: torch.Tensor, window: torch.Tensor,
        k: torch.Tensor, share: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Top-k part ``[B, Hk, W]`` (+ valid): the cached one on a Selection-Cache hit, else fresh."""
        st = ctx.state
        hit = query_reuse(ctx.q, st.get("ts_q"), self.cache_theta)
        prev = st.get("ts_top")
        if prev is not None and bool(hit.all()):
            return prev
        fresh = self._fresh_top(ctx, n, sinks, window, k, share)
        if prev is None or not bool(hit.any()):
            out, q_keep = fresh, ctx.q
        else:
            out = _merge_rows(prev, fresh, hit)
            q_keep = torch.where(hit[:, None, None], st["ts_q"], ctx.q)
        st["ts_q"], st["ts_top"] = q_keep.clone(), out
        return out

    def _fresh_top(
        self, ctx: DecodeContext, n: int | None, sinks: torch.Tensor, window: torch.Tensor,
        k: torch.Tensor, share: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        lengths = ctx.cache.lengths
        if self.prefilter > 0:
            pre = self._prefiltered_top(ctx, n, sinks, window, k, share)
            if pre is not None:
                return pre
        if n is not None and bool((sinks == sinks.flatten()[0]).all() & (k == k.flatten()[0]).all()):
            ni, nl, kk = int(sinks.flatten()[0]), int(window.flatten()[0]), int(k.flatten()[0])
            if kk > 0:  # uniform rows: score the candidate slice only, one top-k per sequence if shared
                v = self.vote(ctx, ni, n - nl, share)
                v = v[:, :1] if share else v
                top = (topk_ascending(v, kk) + ni).expand(*lengths.shape, kk)
                return top, torch.ones_like(top, dtype=torch.bool)
        col = torch.arange(ctx.cache.max_length, device=lengths.device)
        cand = (col >= sinks[..., None]) & (col < (lengths - window)[..., None])
        s = head_scores(ctx.q, ctx.cache.keys(), self.vote_scale)
        s = s.masked_fill(~cand[:, :, None], float("-inf"))
        v = self._smooth(soft_vote(s, share)).masked_fill(~cand, float("-inf"))
        return select_topk(v, k.clamp_min(0), invalid=~cand)

    def _prefiltered_top(
        self, ctx: DecodeContext, n: int | None, sinks: torch.Tensor, window: torch.Tensor,
        k: torch.Tensor, share: bool,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """Top-k part voted over the tokens of the best-bound pages; ``None`` when they cover every page."""
        cache, p = ctx.cache, self.prefilter_page
        lengths = cache.lengths
        lo, hi = sinks, lengths - window  # candidate range [lo, hi)
        kmin, kmax = page_bounds(cache, ctx.state, p, "ts_pb")
        page = torch.arange(kmin.shape[2], device=lengths.device)
        inside = (page * p < hi[..., None]) & ((page + 1) * p > lo[..., None])
        m = torch.ceil(self.prefilter * k.clamp_min(0).double() / p).long()
        if bool((m >= inside.sum(-1)).all()):
            return None
        b, h, d = ctx.q.shape
        hk = kmin.shape[1]
        qg = ctx.q.float().view(b, hk, h // hk, d)
        # bounds @ qᵀ: the tall-GEMM orientation (see head_scores), then max over the group
        u = (kmax @ qg.clamp_min(0).transpose(-1, -2) + kmin @ qg.clamp_max(0).transpose(-1, -2)).amax(-1)
        if share:
            u = u.amax(dim=1, keepdim=True).expand_as(u)
        m0 = int(m.flatten()[0])
        if bool((m == m0).all()) and m0 <= int(inside.sum(-1).min()):
            pages = topk_ascending(u.masked_fill(~inside, float("-inf")), m0)
            pvalid = torch.ones_like(pages, dtype=torch.bool)
        else:
            pages, pvalid = select_topk(u, m, invalid=~inside)
        tok = (pages[..., None] * p + torch.arange(p, device=pages.device)).flatten(2)
        ok = pvalid.repeat_interleave(p, dim=-1) & (tok >= lo[..., None]) & (tok < hi[..., None])
        tok = tok.clamp(max=max(cache.max_length - 1, 0))
        s = head_scores(ctx.q, gather_rows(cache.keys(), tok), self.vote_scale)
        v = soft_vote(s.masked_fill_(~ok[:, :, None], float("-inf")), share)
        k0 = int(k.flatten()[0])
        if bool((k == k0).all()) and k0 <= int(ok.sum(-1).min()):
            cols = topk_ascending(v.masked_fill(~ok, float("-inf")), k0)
            sel_ok = torch.ones_like(cols, dtype=torch.bool)
        else:
            cols, sel_ok = select_topk(v, k.clamp_min(0), invalid=~ok)
        return torch.gather(tok, 2, cols), sel_ok


def _pad_to(x: torch.Tensor, width: int, value: Any) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1]), value=value) if x.shape[-1] < width else x


def _merge_rows(
    prev: tuple[torch.Tensor, torch.Tensor], fresh: tuple[torch.Tensor, torch.Tensor], hit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the cached top part where ``hit [B]``, else the fresh one (padded to one width)."""
    w = max(prev[0].shape[-1], fresh[0].shape[-1])
    h = hit[:, None, None]
    idx = torch.where(h, _pad_to(prev[0], w, 0), _pad_to(fresh[0], w, 0))
    ok = torch.where(h, _pad_to(prev[1], w, False), _pad_to(fresh[1], w, False))
    return idx, ok


def _merge_dense(
    index: torch.Tensor, valid: torch.Tensor, full: torch.Tensor, full_ok: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    w = max(index.shape[-1], full.shape[-1])
    d = dense[..., None]
    idx = torch.where(d, _pad_to(full, w, 0), _pad_to(index, w, 0))
    ok = torch.where(d, _pad_to(full_ok, w, False), _pad_to(valid, w, False))
    width = int(ok.sum(-1).max())
    return idx[..., :width].contiguous(), ok[..., :width].contiguous()
