"""RazorAttention under MPC: a public head split, two secure caches per layer, compaction by public index.

:class:`~mpckv.plaintext.methods.razorattention.RazorAttention` (Tang et al., ICLR 2025, arXiv
2407.15891) delegates here when the backend is secure. Its kept pattern is a function of public data only:
which ``(layer, KV head)`` pairs are retrieval heads (the shipped calibration or ``heads=``, fixed before
any private input exists), the sinks ``N0``, the window ``L_h`` (from the budget and the public prompt
length) and the lengths. So nothing is selected by a secret and nothing is opened.

Why two caches. The secure caches (:class:`~mpckv.protocols.secure_cache.SecureLayerCache`, stock, and
:class:`~mpckv.protocols.persistent_cache.PersistentLayerCache`, persistent mask) hold one public length
per layer. Per-head lengths by padding would not save anything under MPC: every padded slot still costs
its ``q·k`` product, its ``p·v`` product (the persistent cache's ``pv`` opens ``O(L)`` per head) and its
secret exponential in :func:`~mpckv.protocols.numerics.softmax`, which computes ``exp`` of every entry
and only *then* multiplies by the public ``keep`` mask. Instead :class:`HeadSplitCache` keeps a layer's
KV heads in two caches of the backend's kind — the retrieval heads with every entry, the others with
``N0 + 1 + L_h`` — and attends each group with its own query heads (``G`` per KV head), then puts the
outputs back in head order (a public permutation, local). A non-retrieval head's attention then costs
``N0 + 1 + L_h`` entries, not ``N``. When every head of a layer is of one kind no split is made: the layer's
own cache is cut by public index (like StreamingLLM).

Compensation entry: ``k̂ = Σ_{i∈D} k_i · (1/|D|)`` (same for ``v``), a public-weight linear map of secret
shares (local in 2PC: CrypTen's truncation); it is appended as one new row (the persistent cache opens
``2·|S|·d`` masked ring elements for it, ``|S|`` the non-retrieval heads). Under ``decode="slide"`` each
step folds the oldest window entry in with the public weights ``c/(c+1)`` and ``1/(c+1)`` (``c`` the public
count) and replaces the two rows by the folded one: one public-index compaction and one row append.

Cost of the split (once, at prefill, persistent cache only): the retrieval heads' ``N`` rows are appended
to their new cache, i.e. opened again under fresh masks (``2·|R|·N·d`` ring elements; fresh uniform masks,
so the two openings of one row are independent of it), plus ``2·|S|·(N0 + L_h + 1)·d`` for the short
cache. The stock cache splits locally. When the engine gives no ``KVCache`` to swap into (a benchmark
that shares a ready cache calls ``on_prefill`` without ``kv``) the split is deferred to the first decode
step, whose context has it.

Deviations from plaintext: the short cache's rows are stored as ``[sinks | window | compensation]`` (the
plaintext order is ``[sinks | compensation | window]``; attention does not depend on the order, positions
move with the rows). Limits: batch size 1; one window for all non-retrieval heads of a layer; no secure
selection composed after it (``index`` in :meth:`HeadSplitCache.attend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten

if TYPE_CHECKING:
    from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
    from mpckv.plaintext.methods.razorattention import RazorAttention

__all__ = ["HeadSplitCache", "razor_before_append", "razor_prefill"]

STATE = "razor_secure"


def _zeros_like_shares(x: Any, shape: Sequence[int]) -> Any:
    """A sharing of zeros of ``shape`` at ``x``'s precision (every share 0: local, no traffic)."""
    crypten = import_crypten()
    return crypten.mpc.MPCTensor.from_shares(
        torch.zeros(tuple(shape), dtype=torch.long), precision=int(x.encoder.scale).bit_length() - 1
    )


def _heads_index(heads: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(heads), dtype=torch.long)


class HeadSplitCache:
    """One layer's KV heads kept in separate secure caches (groups); public per-head lengths.

    The :class:`~mpckv.plaintext.kv_cache.LayerCache` interface the engine and the secure methods use:
    ``lengths [1, Hk]`` (per head), ``positions()`` / ``valid()`` (padded to the longest group),
    ``keys()`` / ``values()`` (a padded reference view), ``append``, ``compact`` (per group: every row of a
    group keeps the same count), ``attend`` (each group attends alone), sizes and ``close``.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[int], Any]], kv_heads: int, head_dim: int, xp: Any):
        heads = sorted(h for hs, _ in groups for h in hs)
        if heads != list(range(kv_heads)):
            raise ShapeError(f"head groups must partition the {kv_heads} KV heads, got {heads}")
        self.groups = [(list(hs), cache) for hs, cache in groups]
        self.batch, self.kv_heads, self.head_dim, self.xp = 1, kv_heads, head_dim, xp
        self.meta: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self._version = 0
        order = [h for hs, _ in self.groups for h in hs]  # group-major order -> head order
        self._inverse = torch.argsort(_heads_index(order))

    # ------------------------------------------------------------------ public bookkeeping
    @property
    def version(self) -> int:
        return self._version + sum(c.version for _, c in self.groups)

    @property
    def lengths(self) -> torch.Tensor:
        out = torch.zeros(1, self.kv_heads, dtype=torch.long)
        for hs, c in self.groups:
            out[:, _heads_index(hs)] = c.lengths
        return out

    @property
    def max_length(self) -> int:
        return max(c.max_length for _, c in self.groups)

    @property
    def capacity(self) -> int:
        return self.max_length

    @property
    def element_bytes(self) -> int:
        return 8

    def positions(self) -> torch.Tensor:
        out = torch.zeros(1, self.kv_heads, self.max_length, dtype=torch.long)
        for hs, c in self.groups:
            out[:, _heads_index(hs), : c.max_length] = c.positions()
        return out

    def valid(self) -> torch.Tensor:
        return torch.arange(self.max_length)[None, None, :] < self.lengths[..., None]

    def nbytes(self) -> int:
        return sum(c.nbytes() for _, c in self.groups)

    def live_bytes(self) -> int:
        return sum(c.live_bytes() for _, c in self.groups)

    def add_meta(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> Any:
        raise ConfigError(
            "razorattention's split secure cache keeps no per-entry scores; compose it only with methods "
            "that evict by public index"
        )

    def close(self) -> None:
        for _, c in self.groups:
            if hasattr(c, "close"):
                c.close()

    # ------------------------------------------------------------------ secret views (local)
    def _to_head_order(self, parts: list[Any]) -> Any:
        """Concatenate per-group secret tensors ``[1, |group|·m, ...]`` and undo the group order."""
        crypten = import_crypten()
        joined = parts[0] if len(parts) == 1 else crypten.cat(parts, dim=1)
        m = joined.shape[1] // self.kv_heads
        idx = (self._inverse[:, None] * m + torch.arange(m)[None, :]).reshape(-1)
        return joined.index_select(1, idx)

    def _padded(self, which: str) -> Any:
        crypten = import_crypten()
        n, parts = self.max_length, []
        for _, c in self.groups:
            x = c.keys() if which == "k" else c.values()
            if x.shape[2] < n:
                x = crypten.cat([x, _zeros_like_shares(x, (1, x.shape[1], n - x.shape[2], x.shape[3]))], 2)
            parts.append(x)
        return self._to_head_order(parts)

    def keys(self) -> Any:
        """Secret K ``[1, Hk, L_max, d]``, short groups padded with zero shares (a reference view)."""
        return self._padded("k")

    def values(self) -> Any:
        return self._padded("v")

    # ------------------------------------------------------------------ updates (public index)
    def append(
        self, k_new: Any, v_new: Any, pos_new: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        """Append ``[1, Hk, T, d]`` to every group (its heads' slices: a local index_select)."""
        if tuple(k_new.shape[:2]) != (1, self.kv_heads) or k_new.shape[-1] != self.head_dim:
            raise ShapeError(
                f"append expects [1, {self.kv_heads}, T, {self.head_dim}], got {tuple(k_new.shape)}"
            )
        for hs, c in self.groups:
            idx = _heads_index(hs)
            c.append(k_new.index_select(1, idx), v_new.index_select(1, idx), pos_new, counts)

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep the entries at the public ``index [1, Hk, K]``; each group keeps one count for its rows."""
        if not isinstance(index, torch.Tensor):
            raise ConfigError("secure compaction needs a public index (a secret selection is not supported)")
        for hs, c in self.groups:
            idx = _heads_index(hs)
            c.compact(index[:, idx], None if valid is None else valid[:, idx])
        self._version += 1

    # ------------------------------------------------------------------ attention, group by group
    def attend(
        self,
        q: Any,
        scale: float,
        keep: torch.Tensor | None,
        need_probs: bool,
        index: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[Any, Any]:
        """Decode attention of ``q [1, H, d]``: each group's query heads over that group's cache only."""
        if index is not None:
            raise ConfigError(
                "razorattention under MPC: a selection composed after it is not supported (the split "
                "cache attends whole groups)"
            )
        b, h, d = q.shape
        g = h // self.kv_heads
        outs, probs = [], []
        for hs, c in self.groups:
            qidx = (_heads_index(hs)[:, None] * g + torch.arange(g)[None, :]).reshape(-1)
            n = c.max_length
            kg = None if keep is None else keep[:, _heads_index(hs), :n]
            out, p = self.xp.cache_attention(
                q.index_select(1, qidx), c.keys(), c.values(), c.lengths, scale, kg, need_probs
            )
            outs.append(out)
            if need_probs:
                if n < self.max_length:
                    crypten = import_crypten()
                    p = crypten.cat([p, _zeros_like_shares(p, (1, p.shape[1], self.max_length - n))], 2)
                probs.append(p)
        return self._to_head_order(outs), (self._to_head_order(probs) if need_probs else None)


# ---------------------------------------------------------------------------------- the method's hooks
def _uniform(t: torch.Tensor, what: str) -> int:
    vals = t.flatten().unique()
    if vals.numel() != 1:
        raise ConfigError(f"razorattention under MPC needs one {what}, got {vals.tolist()}")
    return int(vals[0])


def _plan(method: RazorAttention, ctx: PrefillContext) -> dict[str, Any]:
    """Public plan of one layer: the head groups, the window, the compensation count."""
    cache = ctx.cache
    if cache.batch != 1:
        raise ConfigError("razorattention under MPC serves one prompt at a time (batch size 1)")
    if isinstance(cache, HeadSplitCache):
        raise ConfigError("razorattention under MPC runs once per layer (its cache is already split)")
    hk, layer = cache.kv_heads, ctx.layer
    chosen = method.retrieval_heads(ctx.config)
    retrieval = [h for h in range(hk) if (layer, h) in chosen]
    short = [h for h in range(hk) if (layer, h) not in chosen]
    prompt = int(ctx.prompt_lengths[0])
    windows = {method.window(prompt, layer, h) for h in short}
    if len(windows) > 1:
        raise ConfigError(
            f"razorattention under MPC needs one window for the non-retrieval heads of a layer (layer "
            f"{layer}: {sorted(windows)}); use a ratio or token budget"
        )
    comp = method.compensation == "mean"
    window = windows.pop() if windows else 0
    return {
        "retrieval": retrieval,
        "short": short,
        "window": window,
        "cap": method.sinks + int(comp) + window,
        "comp": comp,
        "count": 0,  # |D| folded into the compensation entry (public)
        "comp_slot": None,  # slot of the compensation entry in the short cache
        "pending": None,  # a split that waits for a context with a KVCache
    }


def _short_cache(ctx: PrefillContext | DecodeContext) -> Any:
    cache = ctx.cache
    return cache.groups[1][1] if isinstance(cache, HeadSplitCache) else cache


def _mean_rows(x: Any, lo: int, hi: int) -> Any:
    """Secret mean of rows ``[lo, hi)`` of ``x [1, h, L, d]``: a sum times the public ``1/(hi − lo)``."""
    return x[:, :, lo:hi].sum(2, keepdim=True) * (1.0 / (hi - lo))


def _build(
    st: dict[str, Any], ctx: PrefillContext | DecodeContext, keep: list[int], drop: tuple[int, int]
) -> None:
    """Split (or cut) the layer's uniform cache: short heads keep ``keep`` plus, when ``drop`` is a
    non-empty span, its mean as the compensation row."""
    cache = ctx.cache
    n = _uniform(cache.lengths, "cache length")
    pos = cache.positions()
    if not bool((pos == pos[:, :1]).all()):
        raise ConfigError("razorattention under MPC needs the same positions in every KV head")
    lo, hi = drop
    comp = st["comp"] and hi > lo
    short_all = len(st["short"]) == cache.kv_heads
    with comm.op("razor_split"):
        k, v = cache.keys(), cache.values()
        if not short_all:
            ridx, sidx = _heads_index(st["retrieval"]), _heads_index(st["short"])
            full = type(cache)(1, len(st["retrieval"]), cache.head_dim)
            full.append(k.index_select(1, ridx), v.index_select(1, ridx), pos[:, 0])
            short = type(cache)(1, len(st["short"]), cache.head_dim)
            kk = torch.tensor(keep, dtype=torch.long)
            short.append(
                k.index_select(1, sidx).index_select(2, kk),
                v.index_select(1, sidx).index_select(2, kk),
                pos[:, 0, kk],
            )
            if comp:
                ks, vs = k.index_select(1, sidx), v.index_select(1, sidx)
                short.append(_mean_rows(ks, lo, hi), _mean_rows(vs, lo, hi), pos[:, 0, lo : lo + 1])
            if hasattr(cache, "close"):
                cache.close()  # the dealer may forget the original masks
            ctx.replace_cache(
                HeadSplitCache(
                    [(st["retrieval"], full), (st["short"], short)], cache.kv_heads, cache.head_dim, ctx.xp
                )
            )
        else:
            if comp:
                km, vm = _mean_rows(k, lo, hi), _mean_rows(v, lo, hi)
            if len(keep) != n:
                cache.compact(torch.tensor(keep, dtype=torch.long).expand(1, cache.kv_heads, len(keep)))
            if comp:
                cache.append(km, vm, pos[:, 0, lo : lo + 1])
    if comp:
        st["count"] = hi - lo
        st["comp_slot"] = len(keep)


def _split(st: dict[str, Any], ctx: PrefillContext | DecodeContext) -> None:
    """Run the pending split now if the context can swap the layer's cache (``ctx.kv``), else keep it."""
    pending = st["pending"]
    if pending is None:
        return
    needs_swap = len(st["short"]) != ctx.cache.kv_heads
    if needs_swap and ctx.kv is None:
        return
    st["pending"] = None
    _build(st, ctx, *pending)


def razor_prefill(method: RazorAttention, ctx: PrefillContext) -> None:
    """Secure twin of :meth:`RazorAttention.on_prefill`: the same kept entries, by public index."""
    st = _plan(method, ctx)
    ctx.state[STATE] = st
    if not st["short"]:
        return  # every head retrieval: dense
    if ctx.config.sliding_window is not None:
        raise ConfigError("razorattention under MPC: sliding-window models are not supported")
    n = _uniform(ctx.cache.lengths, "cache length")
    n0, w = method.sinks, st["window"]
    if n <= n0 + w:
        return  # nothing dropped yet (decode="slide" may split later)
    keep = list(range(n0)) + list(range(n - w, n))
    st["pending"] = (keep, (n0, n - w))
    _split(st, ctx)


def razor_before_append(method: RazorAttention, ctx: DecodeContext) -> None:
    """Secure twin of :meth:`RazorAttention.before_append` (``decode="slide"``): fold the oldest window
    entry of the short heads into the compensation row (public weights), or drop it."""
    st = ctx.state.get(STATE)
    if st is None:
        raise ConfigError("razorattention: decode before its prefill hook ran (no secure state)")
    _split(st, ctx)  # a split deferred from a prefill context without a KVCache
    if st["pending"] is not None or not st["short"] or method.decode != "slide":
        return
    sc = _short_cache(ctx)
    n = _uniform(sc.lengths, "short-cache length")
    if n < st["cap"]:
        return
    n0 = method.sinks
    if not isinstance(ctx.cache, HeadSplitCache) and len(st["short"]) != ctx.cache.kv_heads:
        # first time full: the heads were not compressed at prefill; split with nothing dropped
        st["pending"] = (list(range(n)), (0, 0))
        _split(st, ctx)
        sc = _short_cache(ctx)
    if st["comp"] and st["comp_slot"] is None:
        st["comp_slot"], st["count"] = n0, 1  # the first window entry becomes the compensation entry
    comp_slot = st["comp_slot"]
    pos = sc.positions()[0, 0]
    window = [i for i in range(n0, n) if i != comp_slot]
    oldest = min(window, key=lambda i: int(pos[i]))
    survivors = [i for i in range(n) if i not in (oldest, comp_slot)]
    idx = torch.tensor(survivors, dtype=torch.long).expand(1, sc.kv_heads, len(survivors))
    with comm.op("razor_slide"):
        if not st["comp"]:
            sc.compact(idx)
            return
        c = st["count"]
        k, v = sc.keys(), sc.values()
        a, b = c / (c + 1), 1.0 / (c + 1)
        kf = k[:, :, comp_slot : comp_slot + 1] * a + k[:, :, oldest : oldest + 1] * b
        vf = v[:, :, comp_slot : comp_slot + 1] * a + v[:, :, oldest : oldest + 1] * b
        label = pos[comp_slot : comp_slot + 1][None]
        sc.compact(idx)
        sc.append(kf, vf, label)
    st["comp_slot"], st["count"] = len(survivors), c + 1
