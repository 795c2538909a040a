"""MPCache — look-once static eviction plus MPC-friendly hierarchical cluster selection.

Zeng, Dong, Zhou, Tan, Wang, Wei, Wang, Li. *MPCache: MPC-Friendly KV Cache Eviction for Efficient Private
Large Language Model Inference.* arXiv 2501.06807 (NeurIPS 2025); code zwxandy/abc, zwxandy/MPCache.
Spec card: ``shared/methods/mpcache.md``.

1. **Static eviction** (prefill, once per layer, permanent): the last ``⌊window_frac·n0⌋`` prompt queries
   vote with their attention probabilities; the ``⌈static_ratio·n0⌉`` best prompt tokens are kept, the
   ``sinks`` first tokens and the observation window always among them. Tokens generated later are never
   statically evicted (decode only appends).
2. **Dynamic selection** (every decode step, per KV head, nothing evicted): the compacted cache is cut
   into clusters of ``cluster_sizes[0] > cluster_sizes[1] > …`` consecutive entries; each cluster has an
   incrementally maintained box (channel-wise key min/max) and is scored by the linear proxy
   ``q·(α·rmax + (1 − α)·rmin)``. The coarsest level keeps a fraction of its clusters, each finer level
   picks among the children of the picks above, and attention runs exactly over the tokens of the
   finest picks. Cluster 0 and the current cluster are forced at every level.
3. **Cross-layer sharing**: in a share group the first layer selects, the others reuse its selection.

The math lives in the pure tensor helpers of :mod:`mpckv.plaintext.methods.clusters` (static votes and
kept counts, boxes, proxy scores, hierarchical selection, cluster → token expansion) so that the secure
engine can reuse it.

Deviations from the official code
---------------------------------
* **Fixed public static ratio** (top-``⌈ρ_s·n0⌉`` by window attention mass, the ``topk`` variant of commit
  8b55d74) instead of the dataset-tuned threshold ``γ`` whose kept count depends on the data (and would
  leak under MPC). ``static_mode="layer"`` (default) averages the votes over all heads and keeps one set
  per layer (the threshold code); ``"head"`` keeps one set per KV head (the topk variant). Sinks and the
  observation window are always kept (not in the code).
* **Causal mask and 1/√d** in the window softmax (both missing in the code). The window is always
  ``0.2·n0`` (the code switches to ``0.1·n0`` above 24k tokens).
* **No overlap padding**: the box of a partial last cluster covers only its real tokens, and that
  cluster (the current one) is forced. The code forces the last cluster only when ``n mod s1 ≠ 0`` and pads
  by repeating earlier tokens.
* **Incremental boxes** (the paper's claim) instead of recomputing every box at every step (code).
* **Budgets**: ``budget`` is the final token budget of the selection (a ratio of the tokens seen so far,
  prompt + generated before static eviction, so that 10 % reads as many entries as Quest at 10 %; or a
  token count): the last level picks ``max(2, tokens // s_last)`` clusters, forced
  ones included (the code uses ``⌊ρ2·C2⌋`` plus up to two forced extras). Upper levels pick
  ``⌊level_ratio·C⌋`` clusters, forced included, raised when needed so their children can host the picks
  below. A token budget covering the whole row reads every cluster.
* **GQA** (not in the paper/code, which are MHA): one selection per KV head from the group mean (or max /
  sum) of the query-head proxy scores.
* **Levels**: any list of cluster sizes each dividing the previous (default 32 → 16, as the code), not
  only two. **Dense layers**: ``dense_layers`` (default 0 and 1, as the topk variant) skip both stages.
* **Sharing**: configurable groups; default pairs ``(2,3), (4,5), …`` (the code leaves the last two layers
  of a 32-layer model unshared too: pass explicit groups for that). The follower reuses the leader's
  *slot* indices. The leader's static kept set is reused only with ``share_static=True`` (the code shares
  it); by default every layer runs its own static eviction, so a follower's slots hold the same sinks,
  window and generated tokens but possibly different middle prompt tokens.
* Top-k ties go to the lower index (the code uses ``torch.topk``, whose ties are unspecified).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.kernels._common import reduce_groups
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection
from mpckv.plaintext.methods.clusters import (
    STATIC_MODES,
    Levels,
    clusters_to_tokens,
    hierarchical_select,
    level_budgets,
    num_clusters,
    proxy_scores,
    proxy_vectors,
    static_forced,
    static_keep_counts,
    static_scores,
    static_window_sizes,
    tracked_boxes,
    tracked_proxy,
)
from mpckv.plaintext.methods.scorers import GROUP_REDUCES, check_choice
from mpckv.plaintext.methods.topk import select_topk, topk_ascending
from mpckv.registry import register_method

_SHARED_SEL = "mpcache_shared_selection"
_SHARED_STATIC = "mpcache_shared_static"


@register_method("mpcache")
@dataclass(kw_only=True)
class MPCache(KVMethod):
    """Static eviction by window attention + hierarchical cluster selection with a linear box proxy.

    Parameters
    ----------
    budget:
        Final tokens read per step and KV head by the selection: a ratio of the tokens the sequence has seen
        (prompt + generated, *before* static eviction, as the paper quotes its budgets), a token count, or
        per-layer / per-head lists. The last level picks
        ``max(2, tokens // cluster_sizes[-1])`` clusters, forced ones included. Default 0.1.
    static_ratio:
        Fraction of the prompt kept per layer by static eviction (``1.0``: no eviction).
    static_mode:
        ``"layer"`` (one kept set per layer, votes averaged over heads) or ``"head"`` (per KV head).
    window_frac:
        Observation window as a fraction of the prompt (paper: the last 20 %).
    sinks:
        First prompt tokens always kept by the static eviction.
    cluster_sizes:
        Cluster size per level, coarse to fine, each dividing the previous (paper: 32, 16).
    level_ratios:
        Fraction of the clusters kept at every level but the last (forced ones included): one float or one
        per upper level (code: 0.5).
    alpha:
        Proxy weight: ``r = α·rmax + (1 − α)·rmin`` (paper: 0.6).
    group_reduce:
        GQA reduction of the query-head proxy scores (and of the ``"head"``-mode static votes).
    dense_layers:
        Layers without static eviction or selection.
    share:
        ``"pairs"`` (layers ``(2,3), (4,5), …`` outside ``dense_layers``), ``"none"``, or a list of layer
        groups: the first layer of a group selects, the others reuse its selection.
    share_static:
        Followers also reuse their leader's static kept set.
    topk_network:
        Under MPC only: the secure top-k of the decode-time selection, ``"bitonic"`` (fewest bytes) or
        ``"rank"`` (all pairs compared at once: two comparison depths instead of ``≈ log²C/2`` stages, for
        more bytes; the better choice where round trips dominate, e.g. WAN). Same picks either way.
    leaky:
        Under MPC only: **reveal** each layer's static kept set to every party and compact by public
        index instead of the oblivious one-hot compaction (default ``False``). This leaks which prompt
        tokens the window attends to; see :mod:`mpckv.protocols.mpcache_secure`.
    """

    static_ratio: float = 0.5
    static_mode: str = "layer"
    window_frac: float = 0.2
    sinks: int = 4
    cluster_sizes: tuple[int, ...] = (32, 16)
    level_ratios: float | tuple[float, ...] = 0.5
    alpha: float = 0.6
    group_reduce: str = "mean"
    dense_layers: tuple[int, ...] = (0, 1)
    share: Any = "pairs"
    share_static: bool = False
    topk_network: str = "bitonic"
    leaky: bool = False

    family = "selection"
    paper = "Zeng et al. (arXiv 2501.06807)"
    secure = "yes"
    default_budget = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.name
        _number(n, "static_ratio", self.static_ratio, open_low=True)
        _number(n, "window_frac", self.window_frac, open_low=True)
        _number(n, "alpha", self.alpha, open_low=False)
        self.sinks = _int_tuple(n, "sinks", (self.sinks,), low=0)[0]
        check_choice(n, "static_mode", self.static_mode, STATIC_MODES)
        check_choice(n, "group_reduce", self.group_reduce, GROUP_REDUCES)
        check_choice(n, "topk_network", self.topk_network, ("bitonic", "rank"))
        if not isinstance(self.share_static, bool):
            raise ConfigError(f"{n}: share_static must be a bool, got {self.share_static!r}")
        if not isinstance(self.leaky, bool):
            raise ConfigError(f"{n}: leaky must be a bool, got {self.leaky!r}")
        sizes = self.cluster_sizes = _int_tuple(n, "cluster_sizes", self.cluster_sizes, low=1)
        if not sizes or any(a % b or a == b for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ConfigError(f"{n}: cluster_sizes must decrease, each dividing the previous: {sizes}")
        ratios = self.level_ratios
        if not isinstance(ratios, list | tuple):
            ratios = (ratios,) * (len(sizes) - 1)
        if len(ratios) != len(sizes) - 1:
            raise ConfigError(f"{n}: level_ratios needs one ratio per upper level, got {ratios!r}")
        self.level_ratios = tuple(_number(n, "level_ratios", r, open_low=True) for r in ratios)
        self.dense_layers = _int_tuple(n, "dense_layers", self.dense_layers, low=0)
        if self.share not in ("pairs", "none"):
            if not isinstance(self.share, list | tuple):
                raise ConfigError(f"{n}: share must be 'pairs', 'none' or a list of layer groups")
            self.share = tuple(_int_tuple(n, "share group", g, low=0) for g in self.share)
            flat = [x for g in self.share for x in g]
            if len(set(flat)) != len(flat) or set(flat) & set(self.dense_layers):
                raise ConfigError(f"{n}: share groups must be disjoint and avoid dense_layers: {self.share}")

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        groups = self.share_groups(config.num_hidden_layers)
        bad = sorted(x for g in groups for x in g if x >= config.num_hidden_layers)
        if bad:
            raise ConfigError(f"{self.name}: share groups name layers {bad} beyond the model's layers")

    # ------------------------------------------------------------------ sharing
    def share_groups(self, num_layers: int) -> list[tuple[int, ...]]:
        """Layer groups sharing one selection (leader = lowest layer)."""
        if self.share == "none":
            return []
        if self.share == "pairs":
            dense = set(self.dense_layers)
            return [(i, i + 1) for i in range(2, num_layers - 1, 2) if not {i, i + 1} & dense]
        return [tuple(sorted(g)) for g in self.share if len(g) > 1]

    def leader_of(self, layer: int, num_layers: int) -> int | None:
        """The layer whose selection ``layer`` reuses, or ``None`` when it selects itself."""
        for g in self.share_groups(num_layers):
            if layer in g[1:]:
                return g[0]
        return None

    @staticmethod
    def _slot(ctx: PrefillContext | DecodeContext, layer: int) -> dict[str, Any]:
        if ctx.all_states:
            return ctx.all_states[layer]
        if layer == ctx.layer:
            return ctx.state
        raise ConfigError("mpcache: cross-layer sharing needs the engine's per-layer states (all_states)")

    # ------------------------------------------------------------------ static eviction
    def on_prefill(self, ctx: PrefillContext) -> None:
        """Static eviction once per layer; a follower layer (``share_static``) reuses its leader's choice.

        Under MPC the choice and the compaction are the secure twins in
        :mod:`mpckv.protocols.mpcache_static_secure` (secret indices); the sharing logic is this one.
        """
        secure = ctx.xp is not None and ctx.xp.secure
        if secure:
            _secure().check_context(self, ctx)
        if ctx.layer in self.dense_layers:
            return
        cache = ctx.cache
        leader = self.leader_of(ctx.layer, ctx.num_layers) if self.share_static else None
        if leader is not None:
            shared = self._slot(ctx, leader).get(_SHARED_STATIC)
            if shared is not None and secure:
                _secure().apply_static(cache, shared)
            elif shared is not None:
                cache.compact(*shared)
        else:
            kept = _secure().static_evict(self, ctx) if secure else self.static_evict(ctx)
            self._slot(ctx, ctx.layer)[_SHARED_STATIC] = kept
        ctx.state["mpcache_static_kept"] = cache.lengths.clone()

    def static_evict(self, ctx: PrefillContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Compact the prompt cache to the public kept count; return the ``(index, valid)`` used (or None)."""
        cache = ctx.cache
        n0 = ctx.prompt_lengths.to(cache.lengths.device).long()
        windows = static_window_sizes(n0, self.window_frac)
        keep = static_keep_counts(n0, self.static_ratio, self.sinks, windows)
        if bool((n0 <= keep).all()):
            return None
        if cache.version != 0:
            raise ConfigError("mpcache static eviction needs the uncompacted prompt cache; put it first")
        b, hk, width = cache.batch, cache.kv_heads, cache.max_length
        scores = static_scores(
            ctx.q, cache.keys(), n0, windows, ctx.scale, self.static_mode, self.group_reduce
        )
        forced = static_forced(n0, windows, self.sinks, width)[:, None].expand(b, hk, width)
        index, valid = select_topk(scores, keep[:, None].expand(b, hk), forced=forced, invalid=~cache.valid())
        cache.compact(index, valid)
        return index, valid

    # ------------------------------------------------------------------ dynamic selection
    def level_sizes(
        self, lengths: torch.Tensor, layer: int, seen: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Clusters picked per level ``[B, Hk]`` (forced included) for rows of ``lengths`` — public.

        ``seen [B]`` is the number of tokens each sequence has had (prompt + generated, before static
        eviction): a ratio budget is a fraction of it, as in the paper, where the final budget is quoted
        against the full context (kept fraction × ρ2). Without ``seen`` the compacted ``lengths`` are the
        base.
        """
        budget, s_last = self.resolved_budget, self.cluster_sizes[-1]
        n_valid = [num_clusters(lengths, s) for s in self.cluster_sizes]
        base = lengths if seen is None else seen.to(lengths.device).long()[:, None].expand_as(lengths)
        rows: list[list[int]] = []
        for row, base_row, nv_row in zip(lengths.tolist(), base.tolist(), n_valid[-1].tolist(), strict=True):
            ks = []
            for head, (n, full, nv) in enumerate(zip(row, base_row, nv_row, strict=True)):
                tokens = budget.tokens_for(max(n, full), layer, head)
                ks.append(nv if tokens >= n else max(2, tokens // s_last))
            rows.append(ks)
        k_last = torch.tensor(rows, dtype=torch.long, device=lengths.device).view_as(lengths)
        ratios = self.level_ratios if isinstance(self.level_ratios, tuple) else (self.level_ratios,)
        return level_budgets(n_valid, k_last, ratios, self.cluster_sizes)

    def select_clusters(self, ctx: DecodeContext) -> Levels | None:
        """Picked clusters per level ``[(index, valid) [B, Hk, K_l]]``, or ``None`` when every cluster of
        every row would be read (dense)."""
        cache = ctx.cache
        ks = self.level_sizes(cache.lengths, ctx.layer, seen=ctx.positions + 1)
        n_valid = [num_clusters(cache.lengths, s) for s in self.cluster_sizes]
        if bool((ks[-1] >= n_valid[-1]).all()):
            return None
        scores = []
        for lvl, (size, nv) in enumerate(zip(self.cluster_sizes, n_valid, strict=True)):
            rmin, rmax = tracked_boxes(ctx.state, cache, size, f"mpcache_box{lvl}")
            scores.append(proxy_scores(ctx.q, proxy_vectors(rmin, rmax, self.alpha), nv, self.group_reduce))
        return hierarchical_select(scores, ks, n_valid, self.cluster_sizes)

    def select(self, ctx: DecodeContext) -> Selection | None:
        if ctx.xp is not None and ctx.xp.secure:
            sel: Selection | None = _secure().select(self, ctx)
            return sel
        if ctx.layer in self.dense_layers:
            return None
        leader = self.leader_of(ctx.layer, ctx.num_layers)
        if leader is not None:
            entry = self._slot(ctx, leader).get(_SHARED_SEL)
            if entry is None or entry[0] != ctx.step or not torch.equal(entry[1], ctx.cache.lengths):
                raise ConfigError(f"mpcache: layer {ctx.layer} has no matching selection of layer {leader}")
            return entry[2]
        n = _uniform(ctx.cache.lengths)
        seen = _uniform(ctx.positions)
        if n is not None and seen is not None and self.resolved_budget.kind != "per_head":
            levels, sel = self._select_uniform(ctx, n, seen + 1)
        else:
            levels = self.select_clusters(ctx)
            sel = None
            if levels is not None:
                idx, valid = clusters_to_tokens(*levels[-1], self.cluster_sizes[-1], ctx.cache.lengths)
                sel = Selection(index=idx, valid=valid)
        ctx.state["mpcache_levels"] = levels
        self._slot(ctx, ctx.layer)[_SHARED_SEL] = (ctx.step, ctx.cache.lengths.clone(), sel)
        return sel

    def _select_uniform(
        self, ctx: DecodeContext, n: int, seen: int
    ) -> tuple[Levels | None, Selection | None]:
        """:meth:`select_clusters` + token expansion when every row has ``n`` entries and has seen ``seen``
        tokens: Python-int budgets, in-place boxes and proxies, and a masked sort per level instead of
        the general masks. Same picks as the general path (ties to the lower index)."""
        sizes, s_last = self.cluster_sizes, self.cluster_sizes[-1]
        nv = [-(-n // s) for s in sizes]
        tokens = self.resolved_budget.tokens_for(max(n, seen), ctx.layer, 0)
        k_last = nv[-1] if tokens >= n else max(2, tokens // s_last)
        if k_last >= nv[-1]:
            return None, None
        ratios = self.level_ratios if isinstance(self.level_ratios, tuple) else (self.level_ratios,)
        ks = [min(k_last, nv[-1])]
        for lvl in range(len(sizes) - 2, -1, -1):  # level_budgets on Python ints
            c, r = nv[lvl], sizes[lvl] // sizes[lvl + 1]
            base = max(2, int(math.floor(c * ratios[lvl] + 1e-9)))
            c_last = nv[lvl + 1] - max(c - 1, 0) * r
            need = 1 + max(0, -(-(ks[0] - c_last) // r))
            ks.insert(0, min(c, max(base, need)))
        b, h, d = ctx.q.shape
        hk = ctx.cache.kv_heads
        q = ctx.q.float().view(b, hk, h // hk, d)
        levels: Levels = []
        picks: torch.Tensor | None = None
        for lvl, (size, c, k) in enumerate(zip(sizes, nv, ks, strict=True)):
            r_vec = tracked_proxy(ctx.state, ctx.cache, size, f"mpcache_box{lvl}", self.alpha, n)
            u = reduce_groups(q @ r_vec.transpose(-1, -2), self.group_reduce, dim=2)  # [B, Hk, C]
            if picks is not None:  # only the children of the previous level's picks
                br = sizes[lvl - 1] // size
                allowed = torch.zeros(b, hk, c, dtype=torch.bool, device=u.device)
                kids = (picks[..., None] * br + torch.arange(br, device=u.device)).reshape(b, hk, -1)
                allowed.scatter_(2, kids.clamp_max(c - 1), True)
                u = u.masked_fill(~allowed, float("-inf"))
                c_last = c - (nv[lvl - 1] - 1) * br
                k = min(k, (picks.shape[-1] - 1) * br + c_last)
            u[..., 0] = float("inf")
            u[..., c - 1] = float("inf")
            picks = topk_ascending(u, k)
            levels.append((picks, torch.ones_like(picks, dtype=torch.bool)))
        assert picks is not None
        k = picks.shape[-1]
        tok = (picks[..., None] * s_last + torch.arange(s_last, device=picks.device)).reshape(
            b, hk, k * s_last
        )
        index = tok[..., : k * s_last - (nv[-1] * s_last - n)].contiguous()  # the last cluster is last
        return levels, Selection(index=index, valid=torch.ones_like(index, dtype=torch.bool))


def _uniform(x: torch.Tensor) -> int | None:
    """The common value of every element of ``x`` (one host sync), or ``None``."""
    flat = x.flatten().tolist()
    return int(flat[0]) if flat and all(v == flat[0] for v in flat) else None


def _secure() -> Any:
    """The secure twin, imported only under MPC (plaintext never imports the protocols package)."""
    return importlib.import_module("mpckv.protocols.mpcache_secure")


def _number(method: str, name: str, val: Any, open_low: bool) -> float:
    """Check ``val`` lies in ``(0, 1]`` (``open_low``) or ``[0, 1]``."""
    num = isinstance(val, int | float) and not isinstance(val, bool)
    if not num or val > 1 or val < 0 or (open_low and val == 0):
        raise ConfigError(f"{method}: {name} must lie in {'(' if open_low else '['}0, 1], got {val!r}")
    return float(val)


def _int_tuple(method: str, name: str, val: Any, low: int) -> tuple[int, ...]:
    if not isinstance(val, list | tuple) or any(
        isinstance(x, bool) or not isinstance(x, int) or x < low for x in val
    ):
        raise ConfigError(f"{method}: {name} must be a list of ints >= {low}, got {val!r}")
    return tuple(val)
