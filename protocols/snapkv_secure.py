"""SnapKV and PyramidKV under MPC: secret window votes, secure top-k, oblivious compaction.

:class:`~mpckv.plaintext.methods.snapkv.SnapKV` (and its subclass
:class:`~mpckv.plaintext.methods.pyramidkv.PyramidKV`, and
:class:`~mpckv.plaintext.methods.h2o_window.H2OWindow`: unpooled votes) delegate their prefill eviction
here when the backend is secure. Capacities come from the plaintext method (:meth:`SnapKV.capacities`:
the budget, and PyramidKV's pyramid of per-layer capacities, are functions of public sizes only), so the
secure cache keeps exactly as many entries per layer as the plaintext one.

Public: the prompt length ``N``, the window ``w``, the capacity ``C`` of every layer, the kernel size and
pooling, and that the last ``min(w, C)`` prompt tokens are kept. Secret: K, V, the votes, and *which*
``C − w`` prefix tokens survive (their positions too: the cache's public position metadata holds
:data:`~mpckv.protocols.mpcache_static_secure.SECRET_POSITION` for them).

Once per layer at prefill (``comm.op("static_eviction")``):

1. **Votes**: ``Σ_w softmax(q_w·Kᵀ/√d)`` over the last ``w`` prompt queries, per query head
   (:func:`~mpckv.protocols.mpcache_static_secure.window_mass`; ``w·d`` opened on a persistent cache).
2. **Pooling** over the prefix ``[0, N − w)`` (stride 1, ``kernel_size // 2`` padding): ``"avg"`` is a
   local sum of shifted shares (the divisor is public and the same everywhere, so it is dropped: the same
   ranking); ``"max"`` a comparison tree over the kernel (out-of-range taps repeat the centre, which
   cannot change a maximum). GQA reduction and pooling run in the plaintext order (pool, then reduce,
   unless they commute); ``"mean"`` is a sum (same ranking).
3. **Top-k**: :func:`~mpckv.protocols.primitives.secure_topk` picks ``C − w`` of the ``N − w`` prefix
   tokens (ties to the lower index, like :func:`~mpckv.plaintext.methods.topk.select_topk`).
4. **Compaction**: :func:`~mpckv.protocols.mpcache_static_secure.apply_static`: one secret one-hot
   product ``[C − w, N − w] · [K | V]`` (or the persistent cache's masked product), rows in ascending
   original order. When ``C ≤ w`` nothing is chosen and the cache is cut by public index.

Limits: batch size 1 (one prompt), capacities equal over KV heads, no sliding-window models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import PrefillContext
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.mpcache_static_secure import StaticChoice, apply_static, window_mass
from mpckv.protocols.primitives import secure_topk, tree_max

if TYPE_CHECKING:
    from mpckv.plaintext.methods.h2o_window import H2OWindow
    from mpckv.plaintext.methods.snapkv import SnapKV

__all__ = ["pool_votes", "reduce_votes", "snapkv_compress", "snapkv_votes"]


def _uniform(t: torch.Tensor, what: str) -> int:
    vals = t.flatten().unique()
    if vals.numel() != 1:
        raise ConfigError(f"snapkv under MPC needs the same {what} in every KV head, got {vals.tolist()}")
    return int(vals[0])


def pool_votes(votes: Any, kernel_size: int, pooling: str) -> Any:
    """Stride-1 pooling of secret ``votes [..., m]`` over its own length (``kernel_size`` odd).

    ``"avg"``: the sum over the kernel (zero padding; the plaintext divides by ``kernel_size``, a public
    constant). ``"max"``: the maximum over the in-range taps.
    """
    if kernel_size == 1:
        return votes
    crypten = import_crypten()
    m = votes.size(-1)
    half = kernel_size // 2
    j = torch.arange(m)[:, None]
    taps = j + torch.arange(-half, half + 1)[None, :]  # [m, kernel]
    inside = (taps >= 0) & (taps < m)
    if pooling == "avg":
        out = None
        for t in range(kernel_size):
            col = taps[:, t].clamp(0, m - 1)
            part = votes[..., col]
            mask = inside[:, t]
            if not bool(mask.all()):
                part = part.clone()
                part.share = part.share * mask.long()  # zero padding (local)
            out = part if out is None else out + part
        return out
    idx = torch.where(inside, taps, j.expand_as(taps))  # out-of-range taps repeat the centre
    stacked = crypten.stack([votes[..., idx[:, t]] for t in range(kernel_size)], dim=-1)
    return tree_max(stacked, dim=-1)


def reduce_votes(votes: Any, group_reduce: str) -> Any:
    """GQA reduction ``[1, Hk, G, m] → [1, Hk, m]``: ``"max"`` a comparison tree, else a sum."""
    if votes.size(2) == 1:
        return votes.squeeze(2)
    return tree_max(votes, dim=2) if group_reduce == "max" else votes.sum(2)


def snapkv_votes(method: SnapKV | H2OWindow, ctx: PrefillContext, n: int, window: int) -> Any:
    """Secret pooled, GQA-reduced votes ``[1, Hk, n − window]`` of the prefix tokens."""
    mass = window_mass(ctx.q, ctx.cache, n, window, ctx.scale)[..., : n - window]  # [1, Hk, G, m]
    k, pooling = getattr(method, "kernel_size", 1), getattr(method, "pooling", "max")  # h2o_window: none
    reduce = method.group_reduce
    linear_pool = k == 1 or (pooling == "avg" and reduce != "max")
    commute = linear_pool or (pooling == "max" and reduce == "max")
    if commute:
        return pool_votes(reduce_votes(mass, reduce), k, pooling)
    return reduce_votes(pool_votes(mass, k, pooling), reduce)


def snapkv_compress(
    method: SnapKV | H2OWindow, ctx: PrefillContext, caps: torch.Tensor
) -> StaticChoice | None:
    """Secure twin of :func:`mpckv.plaintext.methods.scorers.snapkv_compress` (returns the choice)."""
    cache = ctx.cache
    if ctx.config.sliding_window is not None:
        raise ConfigError(f"{method.name} under MPC: sliding-window models are not supported")
    if cache.batch != 1:
        raise ConfigError(f"{method.name} under MPC serves one prompt at a time (batch size 1)")
    n = _uniform(cache.lengths, "cache length")
    cap = _uniform(caps, "capacity")
    if n <= cap:
        return None
    if cache.version != 0 or n != int(ctx.prompt_lengths[0]):
        raise ConfigError(f"{method.name} needs the uncompacted prompt cache; put it first in a composition")
    window = min(method.window, n)
    hk = cache.kv_heads
    if cap <= window:  # only the public window survives: cut by public index
        cache.compact(torch.arange(n - cap, n).expand(1, hk, cap).contiguous())
        return None
    if ctx.q is None:
        raise ConfigError(
            f"{method.name} under MPC needs the secret prompt queries (a secure prefill); a benchmark that "
            "shares a ready cache must compress it in its plaintext set-up"
        )
    hi, k_mid = n - window, cap - window
    choice = StaticChoice(n0=n, lo=0, hi=hi, k_mid=k_mid)
    with comm.op("static_eviction"):
        votes = snapkv_votes(method, ctx, n, window)
        choice.onehot = secure_topk(votes, k_mid)  # [1, Hk, k_mid, hi]
    apply_static(cache, choice)
    return choice
