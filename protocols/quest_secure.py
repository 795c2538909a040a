"""Quest under MPC: secret page bounds, secret top-K pages, oblivious page gather.

:class:`~mpckv.plaintext.methods.quest.Quest` delegates :meth:`~Quest.select` here when the backend is
secure (``ctx.xp.secure``). Sizes come from the plaintext method (:meth:`Quest.page_budget`), so the
secure run reads exactly as many tokens as the plaintext one.

Public: the cache length ``n``, the page size, the page count ``P = ⌈n/p⌉``, the page budget ``K``, the
forced pages (the last page, which holds the current token, and page 0 with ``sink_page``), and
``skip_layers``. Secret: K, V, the page bounds, every score, and *which* other pages a step reads.

Per decode step and layer (``Hk`` KV heads batched in every operation):

1. **Page bounds** ``kmin, kmax [1, Hk, P, d]``: built once by
   :func:`~mpckv.protocols.primitives.block_minmax` and then widened for the appended key
   (:func:`mpckv.protocols.mpcache_secure.tracked_boxes`: ``2·d`` comparisons per step).
2. **Upper bound** ``u = relu(q)·kmaxᵀ + min(q, 0)·kminᵀ``: the sign bits of ``q`` (``H·d``
   comparisons), then *one* secret product ``[q⁺ | q⁻] · [kmax | kmin]ᵀ`` on the stock cache, or two
   products against the bounds held under persistent masks on a persistent-mask cache
   (:func:`persistent_bounds`: ``O(G·d)`` opened instead of ``2·P·d``). The GQA reduction is a
   comparison tree for ``"max"`` (the paper's bound) and a sum for ``"mean"`` / ``"sum"`` (same ranking).
3. **Top-K**: the forced pages never enter the network; :func:`~mpckv.protocols.primitives.secure_topk`
   (the bitonic top-k network, ties to the lower page) picks ``K − #forced`` of the other (full) pages.
4. **Gather**: forced pages are sliced by public index; the picked pages by the secret one-hot over the
   full pages (:func:`mpckv.protocols.mpcache_secure.cluster_gather`: ``gather_onehot`` on a
   persistent-mask cache, one Beaver product on the stock cache). Rows come out in ascending token order.

Traffic labels: ``comm.op("selection")`` (bounds, scores, top-k), ``comm.op("gather")``.
Limits: batch size 1, one budget for every KV head, no sliding-window models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import DecodeContext, Selection
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.mpcache_secure import cluster_gather, tracked_boxes
from mpckv.protocols.mpcache_static_secure import is_persistent
from mpckv.protocols.primitives import ltz, secure_topk, tree_max

if TYPE_CHECKING:
    from mpckv.plaintext.methods.quest import Quest

__all__ = ["PageChoice", "gather_pages", "page_scores", "persistent_bounds", "select", "select_pages"]

_BOUNDS = "quest_secure_bounds"


@dataclass
class PageChoice:
    """One step's pages: ``first`` forced leading pages, ``k_mid`` secret picks among the full pages
    ``first … P − 2`` (``onehot [1, Hk, k_mid, P − 1 − first]``), then the forced last page."""

    page_size: int
    pages: int
    first: int
    k_mid: int
    onehot: Any
    length: int

    @property
    def rows(self) -> int:
        p = self.page_size
        return (self.first + self.k_mid) * p + self.length - (self.pages - 1) * p


def _check(ctx: DecodeContext) -> None:
    if ctx.config.sliding_window is not None:
        raise ConfigError("quest under MPC: sliding-window models are not supported")
    if ctx.cache.batch != 1:
        raise ConfigError("quest under MPC serves one prompt at a time (batch size 1)")


def _uniform(t: torch.Tensor, what: str) -> int:
    vals = t.flatten().unique()
    if vals.numel() != 1:
        raise ConfigError(f"quest under MPC needs the same {what} in every KV head, got {vals.tolist()}")
    return int(vals[0])


def persistent_bounds(state: dict[str, Any], cache: Any, kmin: Any, kmax: Any) -> Any:
    """The page bounds as a persistent-mask table (rows = pages; "keys" = kmax, "values" = kmin).

    Kept in ``state`` and updated like the bounds: a new page appends a row; a widened last page drops
    its row and appends the new one (each distinct row value is opened once, under its own fresh mask:
    ``2·d`` elements per step and head); rebuilt after a compaction or a jump in length.
    """
    from mpckv.protocols.persistent_cache import PersistentLayerCache

    pages, n = kmax.size(2), cache.max_length
    st = state.get(_BOUNDS)
    if st is not None and st["version"] == cache.version and st["n"] + 1 == n:
        table = st["table"]
        if table.max_length == pages:  # the last page widened: replace its row
            keep = torch.arange(pages - 1).expand(1, cache.kv_heads, pages - 1).contiguous()
            table.compact(keep)
        table.append(kmax[:, :, -1:], kmin[:, :, -1:], torch.tensor([[pages - 1]]))
    else:
        if st is not None:
            st["table"].close()
        table = PersistentLayerCache(1, cache.kv_heads, cache.head_dim)
        table.append(kmax, kmin, torch.arange(pages)[None])
    state[_BOUNDS] = {"version": cache.version, "n": n, "table": table}
    return table


def page_scores(method: Quest, ctx: DecodeContext) -> Any:
    """Secret Quest bounds ``[1, Hk, P]`` (GQA-reduced; ``"mean"`` as a sum).

    On a persistent-mask KV cache the bounds are kept under persistent masks too
    (:func:`persistent_bounds`), so ``u`` costs ``O(G·d)`` opened per head instead of re-opening the
    ``2·P·d`` bounds in a Beaver product.
    """
    crypten = import_crypten()
    cache = ctx.cache
    hk = cache.kv_heads
    ((kmin, kmax, _),) = tracked_boxes(ctx.state, cache, (method.page_size,), 1.0)
    q = ctx.q  # [1, H, d]
    g, d = q.shape[1] // hk, q.shape[-1]
    pos = 1 - ltz(q)  # sign bits (scale 1): q⁺ = q·[q ≥ 0] is exact
    q_pos = q * pos
    q_neg = q - q_pos
    if is_persistent(cache):
        table = persistent_bounds(ctx.state, cache, kmin, kmax)
        u = table.qk(q_pos.reshape(1, hk, g, d)) + table.matmul(q_neg.reshape(1, hk, g, d), ("v", "T", 0))
    else:
        x = crypten.cat([q_pos, q_neg], dim=-1).reshape(1, hk, g, 2 * d)
        y = crypten.cat([kmax, kmin], dim=-1)  # [1, Hk, P, 2d]
        u = x.matmul(y.transpose(-1, -2))  # [1, Hk, G, P]
    if g == 1:
        return u.squeeze(2)
    return tree_max(u, dim=2) if method.group_reduce == "max" else u.sum(2)


def select_pages(method: Quest, ctx: DecodeContext) -> PageChoice | None:
    """The secret page choice of one step, or ``None`` (dense: every page fits the budget)."""
    if ctx.layer < method.skip_layers:
        return None
    lengths = ctx.cache.lengths
    n = _uniform(lengths, "cache length")
    p = method.page_size
    pages = -(-n // p)
    k = _uniform(method.page_budget(lengths, ctx.layer), "page budget")
    if pages <= k:
        return None
    first = 1 if method.sink_page else 0
    k_mid = k - 1 - first
    onehot = None
    if k_mid > 0:
        with comm.op("selection"):
            u = page_scores(method, ctx)[..., first : pages - 1]
            onehot = secure_topk(u, k_mid)
    return PageChoice(page_size=p, pages=pages, first=first, k_mid=max(k_mid, 0), onehot=onehot, length=n)


def gather_pages(cache: Any, choice: PageChoice) -> tuple[Any, Any, torch.Tensor, None]:
    """The :class:`Selection` ``gather``: forced pages sliced, picked pages gathered obliviously."""
    crypten = import_crypten()
    n, p = cache.max_length, choice.page_size
    if n != choice.length:
        raise ConfigError(f"quest: selection made for {choice.length} rows applied to a cache of {n}")
    with comm.op("gather"):
        keys, values = cache.keys(), cache.values()
        lo = choice.first * p
        ks, vs = [], []
        if lo:
            ks.append(keys[:, :, :lo])
            vs.append(values[:, :, :lo])
        if choice.k_mid > 0:
            count = choice.pages - 1 - choice.first
            mk, mv = cluster_gather(cache, choice.onehot, p, choice.first, count)
            ks.append(mk)
            vs.append(mv)
        ks.append(keys[:, :, (choice.pages - 1) * p : n])
        vs.append(values[:, :, (choice.pages - 1) * p : n])
        k_rows = ks[0] if len(ks) == 1 else crypten.cat(ks, dim=2)
        v_rows = vs[0] if len(vs) == 1 else crypten.cat(vs, dim=2)
    lengths = torch.full((1, cache.kv_heads), choice.rows, dtype=torch.long)
    return k_rows, v_rows, lengths, None


def _make_gather(choice: PageChoice) -> Callable[[Any], tuple[Any, Any, torch.Tensor, None]]:
    def gather(cache: Any) -> tuple[Any, Any, torch.Tensor, None]:
        return gather_pages(cache, choice)

    return gather


def select(method: Quest, ctx: DecodeContext) -> Selection | None:
    """Secure twin of :meth:`Quest.select`: ``index``/``valid`` carry only the public row count."""
    _check(ctx)
    choice = select_pages(method, ctx)
    ctx.state["quest_secure_choice"] = choice
    if choice is None:
        return None
    hk, rows = ctx.cache.kv_heads, choice.rows
    return Selection(
        index=torch.zeros(1, hk, rows, dtype=torch.long),
        valid=torch.ones(1, hk, rows, dtype=torch.bool),
        gather=_make_gather(choice),
    )
