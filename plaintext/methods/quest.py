"""Quest — query-aware page selection with per-page key bounds.

Tang, Zhao, Zhu, Xiao, Kasikci, Han. *Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference.* ICML 2024, arXiv 2406.10774 (code: github.com/mit-han-lab/Quest).

The cache of every (sequence, KV head) row is cut into pages of ``page_size`` consecutive entries. Per page
the channel-wise minimum and maximum of its keys are kept; at each decode step the upper bound
``u[p] = relu(q)·kmax[p] + min(q, 0)·kmin[p] >= max_{t in p} q·k_t`` ranks the pages, the ``K`` best are
read (the last page, which holds the current token, always among them) and exact attention runs over
their tokens. Nothing is evicted: the full cache stays in memory, Quest only chooses what to *read*.

Deviations from the paper (see ``shared/methods/quest.md``):

* **GQA.** The official kernels are MHA only. We keep one page list per KV head and score it with the
  maximum of ``u`` over the query heads of the group (``group_reduce="max"``), which is still an upper
  bound for every head of the group; ``"mean"`` and ``"sum"`` are offered too.
* **Budget.** ``K = max(min_pages, tokens // page_size)`` pages with ``tokens`` the token budget of the
  current row length (a ratio is of the current cache length, so ``snapkv+quest`` reads the product of
  the two fractions). The budget counts the forced last page (the kernel path's
  ``inference_page_budget``). A token budget of at least the row length reads every page.
* **Bounds on post-RoPE keys**, as in the paper (looser for far pages since RoPE rotates channel pairs).
* **Optional sink page** (``sink_page=True`` forces page 0); off by default as in Quest.
* **Cost.** Page bounds are updated in place for the one appended entry (buffers with spare pages, grown
  in chunks), the page budget is computed once per step when rows share a length, and that common case
  ranks and expands pages without masks (see :meth:`Quest.select`).
* **No kernel-path paging.** Metadata and the selection are plain tensors: pages are built over the
  engine's (compacted) cache layout, page bounds come from :mod:`mpckv.kernels.page_bounds`, and the
  selected pages are expanded to token indices that the engine gathers (no paged-attention kernel).
* The first ``skip_layers`` layers (paper: 2) attend densely; so does every step where the row has no
  more than ``K`` pages.
* **Under MPC** (``ctx.xp.secure``) :meth:`Quest.select` delegates to :mod:`mpckv.protocols.quest_secure`:
  secret page bounds and scores, the secure top-k network, an oblivious page gather; page counts and
  budgets are public. ``"mean"`` is ranked as a sum there (the same order).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mpckv.errors import ConfigError
from mpckv.kernels._common import reduce_groups
from mpckv.kernels.page_bounds import (
    grow_page_bounds,
    num_valid_pages,
    page_minmax,
    page_upper_bound,
    widen_page_bounds_,
)
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, Selection
from mpckv.plaintext.methods.topk import select_topk, topk_ascending
from mpckv.registry import register_method

_GROUP_REDUCES = ("max", "mean", "sum")


@register_method("quest")
@dataclass(kw_only=True)
class Quest(KVMethod):
    """Query-aware top-K page selection from per-page key min/max bounds (Tang et al., ICML 2024).

    Parameters
    ----------
    budget:
        Tokens read per step and KV head: a ratio of the current cache length, a token count, or a
        per-layer / per-head list. Converted to ``K = max(min_pages, tokens // page_size)`` pages,
        the forced last page included. Default: 1024 tokens (the paper's near-lossless LongBench setting).
    page_size:
        Consecutive cache entries per page (paper: 16).
    skip_layers:
        The first layers attend densely (paper: 2).
    group_reduce:
        How the per-query-head bounds of a GQA group become one page score: ``"max"`` (keeps the bound for
        every head), ``"mean"`` or ``"sum"``.
    sink_page:
        Also force page 0 (not in Quest).
    min_pages:
        Lower limit of ``K`` (the paper's evaluation path uses 3). Raised to 2 when ``sink_page`` is set.
    """

    page_size: int = 16
    skip_layers: int = 2
    group_reduce: Literal["max", "mean", "sum"] = "max"
    sink_page: bool = False
    min_pages: int = 1

    family = "selection"
    paper = "Tang et al., ICML 2024 (arXiv 2406.10774)"
    secure = "yes"
    default_budget = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("page_size", 1), ("skip_layers", 0), ("min_pages", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ConfigError(f"quest {name} must be an int >= {low}, got {val!r}")
        if self.group_reduce not in _GROUP_REDUCES:
            raise ConfigError(
                f"quest group_reduce must be one of {_GROUP_REDUCES}, got {self.group_reduce!r}"
            )
        if not isinstance(self.sink_page, bool):
            raise ConfigError(f"quest sink_page must be a bool, got {self.sink_page!r}")

    # ------------------------------------------------------------------ metadata
    def page_bounds(self, ctx: DecodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-page key bounds ``kmin, kmax [B, Hk, n_pages, d]`` (fp32) of the current cache.

        Kept in ``ctx.state`` (``quest_kmin`` / ``quest_kmax``, buffers with spare pages that grow in
        chunks; the returned tensors are views of their first ``n_pages``): rebuilt from scratch on the
        first call, after a compaction (``cache.version`` changed) or when rows changed by more than one
        append since the last call; otherwise only the page receiving the entry appended at
        ``lengths - 1`` of every row that grew is widened, in place (``2·d`` comparisons per row).
        """
        cache, st = ctx.cache, ctx.state
        lengths = cache.lengths
        n_pages = -(-cache.max_length // self.page_size)
        prev = st.get("quest_lengths")
        same = (
            prev is not None
            and prev.shape == lengths.shape
            and st.get("quest_version") == cache.version
            and st.get("quest_page_size") == self.page_size
        )
        grown = lengths - prev if same else None
        if grown is None or not bool(((grown == 0) | (grown == 1)).all()):
            kmin, kmax = page_minmax(cache.keys(), lengths, self.page_size)
        else:
            kmin, kmax = grow_page_bounds(st["quest_kmin"], st["quest_kmax"], n_pages)
            widen_page_bounds_(kmin, kmax, cache.k, lengths, grown, self.page_size)
        st.update(quest_kmin=kmin, quest_kmax=kmax, quest_lengths=lengths.clone())
        st.update(quest_version=cache.version, quest_page_size=self.page_size)
        return kmin[:, :, :n_pages], kmax[:, :, :n_pages]

    def page_scores(self, ctx: DecodeContext) -> torch.Tensor:
        """Quest bounds ``[B, Hk, n_pages]`` (fp32) reduced over each GQA group, ``-inf`` past the end."""
        kmin, kmax = self.page_bounds(ctx)
        n_valid = num_valid_pages(ctx.cache.lengths, self.page_size)
        return page_upper_bound(ctx.q, kmin, kmax, n_valid, self.group_reduce)

    # ------------------------------------------------------------------ budget
    def page_budget(self, lengths: torch.Tensor, layer: int) -> torch.Tensor:
        """Pages ``K [B, Hk]`` to read for rows of ``lengths [B, Hk]``.

        ``K = max(min_pages, tokens // page_size)`` (2 at least with a sink page), or every page of the
        row when its token budget covers the whole row.
        """
        budget = self.resolved_budget
        n_valid = num_valid_pages(lengths, self.page_size)
        floor = max(self.min_pages, 2 if self.sink_page else 1)
        out: list[list[int]] = []
        for row, nv_row in zip(lengths.tolist(), n_valid.tolist(), strict=True):
            ks = []
            for head, (n, nv) in enumerate(zip(row, nv_row, strict=True)):
                tokens = budget.tokens_for(n, layer, head)
                ks.append(nv if tokens >= n else max(floor, tokens // self.page_size))
            out.append(ks)
        return torch.tensor(out, dtype=torch.long, device=lengths.device).view_as(lengths)

    # ------------------------------------------------------------------ selection
    def select_pages(self, ctx: DecodeContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Selected pages ``(index, valid) [B, Hk, K]`` (ascending, valid first), or ``None`` for dense."""
        if ctx.layer < self.skip_layers:
            return None
        lengths = ctx.cache.lengths
        n_valid = num_valid_pages(lengths, self.page_size)
        k_pages = self.page_budget(lengths, ctx.layer)
        if bool((n_valid <= k_pages).all()):
            return None
        scores = self.page_scores(ctx)
        n_pages = scores.shape[-1]
        page = torch.arange(n_pages, device=scores.device)
        invalid = page >= n_valid[..., None]
        forced = page == (n_valid - 1)[..., None]
        if self.sink_page:
            forced = forced | (page == 0)
        return select_topk(scores, k_pages, forced=forced & ~invalid, invalid=invalid)

    def select(self, ctx: DecodeContext) -> Selection | None:
        """Token indices of the selected pages; entries past a row's length are marked invalid.

        When every row has the same length and budget (batch of equal prompts, a budget uniform over
        heads) a lean path scores, ranks and expands the pages with a handful of tensor operations and no
        masks; it returns exactly what the general path returns (same ranking, ties to the lower page).
        """
        if ctx.xp is not None and ctx.xp.secure:
            sel: Selection | None = _secure().select(self, ctx)
            return sel
        if ctx.layer < self.skip_layers:
            return None
        n = _uniform_length(ctx.cache.lengths)
        if n is not None and self.resolved_budget.kind != "per_head":
            return self._select_uniform(ctx, n)
        return self._select_general(ctx)

    def _select_uniform(self, ctx: DecodeContext, n: int) -> Selection | None:
        p = self.page_size
        nv = -(-n // p)
        tokens = self.resolved_budget.tokens_for(n, ctx.layer, 0)
        k = nv if tokens >= n else max(self.min_pages, 2 if self.sink_page else 1, tokens // p)
        if nv <= k:
            return None
        kmin, kmax = self.page_bounds(ctx)
        b, h, d = ctx.q.shape
        hk = kmin.shape[1]
        q = ctx.q.float().view(b, hk, h // hk, d)
        u = q.clamp_min(0) @ kmax.transpose(-1, -2) + q.clamp_max(0) @ kmin.transpose(-1, -2)
        scores = reduce_groups(u, self.group_reduce, dim=2)  # [B, Hk, nv]
        scores[..., nv - 1] = float("inf")  # the page holding the current token
        if self.sink_page:
            scores[..., 0] = float("inf")
        pages = topk_ascending(scores, k)  # ascending; the last page (nv - 1) comes last
        tok = (pages[..., None] * p + torch.arange(p, device=pages.device)).reshape(b, hk, k * p)
        count = k * p - (nv * p - n)  # the last page may be partial: its tail is at the end
        index = tok[..., :count].contiguous()
        return Selection(index=index, valid=torch.ones_like(index, dtype=torch.bool))

    def _select_general(self, ctx: DecodeContext) -> Selection | None:
        pages = self.select_pages(ctx)
        if pages is None:
            return None
        pidx, pvalid = pages
        b, hk, kp = pidx.shape
        p = self.page_size
        tok = (pidx[..., None] * p + torch.arange(p, device=pidx.device)).reshape(b, hk, kp * p)
        valid = pvalid[..., None].expand(b, hk, kp, p).reshape(b, hk, kp * p)
        valid = valid & (tok < ctx.cache.lengths[..., None])
        # valid columns first, ascending (pages are ascending, so this only moves the padding)
        key = torch.where(valid, tok, torch.full_like(tok, torch.iinfo(torch.long).max))
        key, order = torch.sort(key, dim=-1, stable=True)
        valid = torch.gather(valid, 2, order)
        index = torch.where(valid, key, torch.zeros_like(key))
        width = int(valid.sum(-1).max())
        return Selection(index=index[..., :width].contiguous(), valid=valid[..., :width].contiguous())


def _uniform_length(lengths: torch.Tensor) -> int | None:
    """The common length of every row, or ``None`` when rows differ (one host sync)."""
    flat = lengths.flatten().tolist()
    return flat[0] if flat and all(x == flat[0] for x in flat) else None


def _secure() -> Any:
    """The secure twin, imported only under MPC (plaintext never imports the protocols package)."""
    return importlib.import_module("mpckv.protocols.quest_secure")
