"""Secure twins of the selection primitives KV methods use: top-k, one-hot gather, block bounds, scores.

Each function takes CrypTen ``MPCTensor`` s (secret shares) and mirrors a plaintext twin defined here
with the ``_plain`` suffix (the top-k twin reuses :func:`mpckv.plaintext.methods.topk.select_topk`).
Everything that fixes the amount of work — shapes, ``k``, block sizes, ``forced`` masks — is public.

Encodings. Comparisons return **bits in CrypTen's scale-1 encoding** (``encoder.scale == 1``; the
values 0/1, decoded as int64). Multiplying a bit by a fixed-point tensor is exact (no truncation), which
is why :func:`secure_topk` returns its one-hot in that encoding and :func:`onehot_gather` is exact.
Never multiply a scale-1 tensor by a Python float (CrypTen would encode the float at scale 1, i.e.
truncate it to an integer), and avoid ``fixed + bits``: CrypTen re-encodes the bits *in place*. Use
:func:`to_fixed` to turn bits into ordinary fixed-point values.

Costs (2PC CrypTen, ``c`` = one comparison ≈ 8 rounds, ≈ 430 B per element; ``m`` = one multiplication
round): :func:`secure_topk` over ``n`` padded to ``N = 2**b`` runs a bitonic network of
``b(b+1)/2`` stages of ``N/2`` compare-exchanges (each stage ``c + m``), then ``n`` comparisons, one
multiplication and ``K·n`` equality tests (≈ 7 rounds, ≈ 210 B each). :func:`block_minmax` costs
``log2 P`` stages (``P`` = block size rounded up to a power of two) and ≈ 1.5 comparisons per key
element. :func:`linear_block_scores` is one secret matmul (1 round) and no comparison.
Measured (2PC TFP, party 0, ``cfg.communicator.verbose``): top-k with one-hot output n=16/k=4:
106 rounds, 0.06 MB; n=64/k=13: 205 rounds, 0.52 MB; n=256/k=51: 340 rounds, 5.0 MB (of which the
``K·n`` equalities ≈ 2.7 MB). Block bounds n=1024, d=64, size 16: 36 rounds, 42 MB (CrypTen's
``max`` per block: 58 rounds, 94 MB).

Paper: MPCache (Zeng et al., arXiv 2501.06807) — look-once eviction plus clustered selection with the
linear proxy ``q·(α·max + (1−α)·min)``; its SPU code uses a top-k plus ``idx→one-hot`` equality tests.
We fold the index into the sort key instead (deterministic ties: lower index wins) and read the one-hot
off the rank of each selected entry, so the rows come out in ascending index order like
:func:`~mpckv.plaintext.methods.topk.select_topk`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.protocols.compat import import_crypten

__all__ = [
    "is_secret",
    "public_to_shared",
    "to_fixed",
    "select",
    "tree_max",
    "secure_topk",
    "onehot_gather",
    "block_minmax",
    "linear_block_scores",
    "topk_onehot_plain",
    "onehot_gather_plain",
    "block_minmax_plain",
    "linear_block_scores_plain",
    "SCORE_LIMIT",
    "TOPK_NETWORKS",
]

SCORE_LIMIT = 2.0**23
"""Scores passed to :func:`secure_topk` must satisfy ``|score| < SCORE_LIMIT`` (keys stay in the ring)."""

_FORCED_SHIFT = 40  # forced bonus / padding penalty = 2**(b + 40) in key units (scores use b + 16 + 23 bits)


def _mpc() -> Any:
    return import_crypten().mpc.MPCTensor


def _rank() -> int:
    return int(import_crypten().communicator.get().get_rank())


def is_secret(x: Any) -> bool:
    """True for a CrypTen tensor (secret shares), False for a torch tensor or a number."""
    return bool(import_crypten().is_encrypted_tensor(x))


def _from_share(share: torch.Tensor, precision: int) -> Any:
    return _mpc().from_shares(share, precision=precision)


def _add_public(share: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Shares of ``x + value`` for a public ring-integer ``value`` (party 0 adds it)."""
    return share + value if _rank() == 0 else share + torch.zeros_like(value)


def public_to_shared(value: torch.Tensor, precision: int | None = None) -> Any:
    """A public tensor as a CrypTensor without communication (party 0 holds it, the others hold 0).

    ``precision=None`` uses CrypTen's default fixed point; ``precision=0`` stores integers (bits).
    """
    crypten = import_crypten()
    p = crypten.cfg.encoder.precision_bits if precision is None else precision
    ring = value.long() if p == 0 else (value.double() * 2**p).round().long()
    return _from_share(_add_public(torch.zeros_like(ring), ring), p)


def to_fixed(bits: Any) -> Any:
    """Scale-1 integers (e.g. comparison bits) as ordinary fixed-point values (local, exact)."""
    crypten = import_crypten()
    if bits.encoder.scale != 1:
        return bits
    p = crypten.cfg.encoder.precision_bits
    return _from_share(bits.share * (1 << p), p)


def select(cond: Any, a: Any, b: Any) -> Any:
    """``where(cond, a, b)`` with one multiplication: ``b + cond·(a − b)``.

    ``cond`` is a secret bit tensor in scale-1 encoding (as returned by comparisons), which makes the
    product exact, or a public bool tensor (then no multiplication at all). ``a`` and ``b`` share one
    encoding.
    """
    if not is_secret(cond):
        c = cond.to(torch.long)
        out = b.clone()
        out.share = b.share + c * (a.share - b.share)
        return out
    if cond.encoder.scale != 1:
        raise ValueError("select needs bits in scale-1 encoding (a comparison result)")
    return b + cond * (a - b)


def _cmp_ge(a: Any, b: Any) -> Any:
    """Bits ``a >= b`` (scale 1): one comparison over the broadcast shape."""
    return 1 - (a - b).lt(0)


def _halves(x: Any, dim: int) -> tuple[Any, Any, Any | None]:
    n = x.size(dim)
    h = n // 2
    a = x.narrow(dim, 0, h)
    b = x.narrow(dim, h, h)
    rest = x.narrow(dim, 2 * h, 1) if n % 2 else None
    return a, b, rest


def tree_max(x: Any, dim: int = -1, keepdim: bool = False) -> Any:
    """Maximum over ``dim`` by a ``ceil(log2 n)``-level tree of ``where(a >= b, a, b)``.

    Exact (selection by bits, no truncation). Cost: ``n − 1`` comparisons in ``ceil(log2 n)`` rounds of
    (comparison + one multiplication). Unlike CrypTen's ``max`` it computes no argmax.
    """
    crypten = import_crypten()
    dim = dim % x.dim()
    while x.size(dim) > 1:
        a, b, rest = _halves(x, dim)
        m = select(_cmp_ge(a, b), a, b)
        x = m if rest is None else crypten.cat([m, rest], dim=dim)
    return x if keepdim else x.squeeze(dim)


# ---------------------------------------------------------------------------------------------- top-k
def _row_budget(lead: torch.Size, n: int, k: int, forced: torch.Tensor | None) -> torch.Tensor:
    if k < 0:
        raise ConfigError(f"k must be >= 0, got {k}")
    kk = torch.full(lead, k, dtype=torch.long)
    if forced is not None:
        kk = torch.maximum(kk, forced.sum(-1).long())
    return kk.clamp(0, n)


TOPK_NETWORKS = ("bitonic", "rank")
"""Ways :func:`secure_topk` finds the selected entries: few bytes (``bitonic``) or few rounds (``rank``)."""


def secure_topk(scores: Any, k: int, forced: torch.Tensor | None = None, network: str = "bitonic") -> Any:
    """One-hot selection of the ``k`` best entries of every row of secret ``scores [..., n]``.

    Parameters
    ----------
    scores:
        Secret fixed-point scores, ``|score| < SCORE_LIMIT`` (2**23).
    k:
        Public budget per row, clamped to ``n``.
    forced:
        Public bool mask like ``scores``: entries always selected (rows may then keep more than ``k``).
    network:
        ``"bitonic"`` (default): a bitonic sorting network, ``≈ n·log²n/4`` comparisons in
        ``log n·(log n + 1)/2`` sequential stages, then one comparison against the ``kk``-th key.
        ``"rank"``: every pair compared at once (``n(n − 1)/2`` comparisons in *one* stage), each entry's
        rank summed locally, then one comparison ``rank < kk`` — the same selection in two comparison
        depths instead of ``≈ log²n/2``, for ``≈ 2n/log²n`` times the comparisons. Prefer it where
        round trips cost more than bytes (WAN) and rows are short (tens to a few hundred entries).

    Returns
    -------
    Secret ``[..., K, n]`` bits (scale-1 encoding), ``K = max over rows of min(n, max(k, #forced))``.
    Row ``r`` of a slice is the one-hot of its ``r``-th selected index in **ascending index order**;
    rows past the row's own budget are zero — the same as :func:`topk_onehot_plain`. Ties in the
    fixed-point scores go to the lower index.

    Method: keys ``score·2**b + (N−1−i)`` (``N = 2**b ≥ n``; forced entries get ``+2**(b+40)``, padding
    ``−2**(b+40)``) are all distinct; a bitonic network sorts them descending, the row's ``kk``-th key
    becomes a threshold, ``sel = key >= threshold``, the exclusive prefix sum of ``sel`` is each
    selected entry's output row, and ``K·n`` equality tests build the one-hot.
    """
    if network not in TOPK_NETWORKS:
        raise ConfigError(f"secure top-k network must be one of {TOPK_NETWORKS}, got {network!r}")
    n = scores.size(-1)
    lead = torch.Size(scores.size()[:-1])
    if forced is not None and tuple(forced.shape) != tuple(scores.size()):
        raise ShapeError(f"forced mask shape {tuple(forced.shape)} != scores shape {tuple(scores.size())}")
    kk = _row_budget(lead, n, k, forced)
    kmax = int(kk.max()) if kk.numel() else 0
    if kmax == 0 or n == 0:
        return _from_share(torch.zeros(*lead, kmax, n, dtype=torch.long), 0)

    b = max(1, math.ceil(math.log2(n)))
    big = 1 << (b + _FORCED_SHIFT)
    npad = 1 << b
    offsets = torch.arange(npad - 1, npad - 1 - n, -1, dtype=torch.long).expand(*lead, n)
    pub = offsets.clone()
    if forced is not None:
        pub = pub + forced.to(torch.long) * big
    key_share = _add_public(scores.share * (1 << b), pub)
    if network == "rank":
        sel = _rank_select(_from_share(key_share, 0), kk)
    else:
        if npad > n:
            pad_pub = torch.full((*lead, npad - n), -big, dtype=torch.long)
            key_share = torch.cat([key_share, _add_public(torch.zeros_like(pad_pub), pad_pub)], dim=-1)
        keys = _from_share(key_share, 0)
        sorted_keys = _bitonic_sort_desc(keys, npad)
        thr = sorted_keys.gather(-1, (kk - 1).clamp_min(0).unsqueeze(-1))  # [..., 1]
        sel = 1 - (keys[..., :n] - thr).lt(0)  # key >= threshold
    if bool((kk == 0).any()):  # rows with nothing to select
        sel = sel * (kk > 0).long().unsqueeze(-1)
    excl = sel.clone()
    excl.share = sel.share.cumsum(-1) - sel.share
    slot = sel * (excl + 1) - 1  # output row of a selected entry, -1 elsewhere (exact: scale 1)
    rows = torch.arange(kmax, dtype=torch.long).view(*([1] * len(lead)), kmax, 1)
    return slot.unsqueeze(-2).expand(*lead, kmax, n).eq(rows.expand(*lead, kmax, n))


def _rank_select(keys: Any, kk: torch.Tensor) -> Any:
    """Bits ``rank < kk`` of distinct scale-1 ``keys [..., n]``, ``rank`` = number of larger keys.

    One batched comparison per pair ``i < j`` (``g = [key_j > key_i]``); then, locally on the shares,
    ``rank_i = Σ_{j>i} g_ij + Σ_{j<i} (1 − g_ji)``; then one comparison per entry.
    """
    n = keys.size(-1)
    if n == 1:
        rank_share = torch.zeros_like(keys.share)
    else:
        first, second = torch.triu_indices(n, n, offset=1)
        g = 1 - (keys[..., second] - keys[..., first]).lt(0)  # key_second > key_first (keys distinct)
        gs = g.share
        zeros = torch.zeros_like(keys.share)
        rank_share = zeros.scatter_add(-1, first.expand_as(gs), gs) - zeros.scatter_add(
            -1, second.expand_as(gs), gs
        )
        rank_share = _add_public(rank_share, torch.arange(n).expand_as(rank_share))  # + #(j < i)
    rank = _from_share(_add_public(rank_share, -kk.unsqueeze(-1).expand_as(rank_share)), 0)
    return rank.lt(0)  # rank − kk < 0


def _bitonic_sort_desc(keys: Any, npad: int) -> Any:
    """Sort distinct scale-1 keys ``[..., npad]`` (npad a power of two) in descending order."""
    crypten = import_crypten()
    idx = torch.arange(npad)
    size = 2
    while size <= npad:
        stride = size // 2
        while stride >= 1:
            first = idx[(idx & stride) == 0]
            second = first + stride
            # blocks with (i & size) == 0 end up descending, the others ascending (then merged)
            desc = ((first & size) == 0).long()
            a = keys[..., first]
            bb = keys[..., second]
            lt = (a - bb).lt(0)  # a < b
            swap = lt.clone()
            swap.share = lt.share * (2 * desc - 1)
            swap.share = _add_public(swap.share, (1 - desc).expand_as(lt.share))
            new_a = a + swap * (bb - a)
            new_b = a + bb - new_a
            inv = torch.argsort(torch.cat([first, second]))
            keys = crypten.cat([new_a, new_b], dim=-1)[..., inv]
            stride //= 2
        size *= 2
    return keys


def topk_onehot_plain(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Plaintext twin of :func:`secure_topk`: one-hot rows of ``select_topk`` (invalid rows zero)."""
    from mpckv.plaintext.methods.topk import select_topk

    n = scores.shape[-1]
    index, valid = select_topk(scores, k, forced=forced)
    oh = torch.nn.functional.one_hot(index, n) if index.numel() else index.new_zeros(*index.shape, n)
    return oh * valid.unsqueeze(-1).long()


# --------------------------------------------------------------------------------------------- gather
def onehot_gather(onehot: Any, x: Any) -> Any:
    """Rows of ``x [..., n, d]`` picked by ``onehot [..., k, n]``: ``onehot @ x`` → ``[..., k, d]``.

    Secret one-hot bits (scale 1, from :func:`secure_topk`) make the result exact; a fixed-point one-hot
    adds one truncation (±1 step). A public one-hot (torch tensor) is applied locally to the shares,
    exactly and without communication. Cost (secret × secret): one round, ``k·n + n·d`` opened elements.
    """
    if not is_secret(onehot):
        out = x.clone()
        out.share = onehot.to(torch.long).matmul(x.share)
        return out
    return onehot.matmul(x)


def onehot_gather_plain(onehot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Plaintext twin of :func:`onehot_gather`."""
    return onehot.to(x.dtype).matmul(x)


# --------------------------------------------------------------------------------------- block bounds
def _block_index(n: int, size: int) -> tuple[torch.Tensor, int, int]:
    """Slot → token index for blocks of ``size`` padded to a power of two by repeating the last token."""
    if size < 1:
        raise ConfigError(f"block size must be >= 1, got {size}")
    c = -(-n // size)
    p = 1 << max(0, math.ceil(math.log2(size)))
    start = torch.arange(c).unsqueeze(1) * size
    length = torch.clamp(n - start, max=size)
    slot = torch.minimum(torch.arange(p).unsqueeze(0), length - 1)
    return (start + slot).reshape(-1), c, p


def block_minmax(k: Any, size: int) -> tuple[Any, Any]:
    """Element-wise min and max of the keys of every block of ``size`` consecutive tokens.

    ``k [..., n, d]`` secret → ``(min, max)``, each ``[..., ceil(n/size), d]``. A last partial block
    covers only its own tokens. Exact (selection, no truncation). Cost: ``log2 P`` rounds of
    (comparison + multiplication), ``P`` = size rounded up to a power of two; the first level yields
    min and max from one comparison, later levels run both trees in one batch.
    """
    crypten = import_crypten()
    n, d = k.size(-2), k.size(-1)
    lead = tuple(k.size()[:-2])
    index, c, p = _block_index(n, size)
    if p == size and n == c * size:
        t = k.reshape(*lead, c, p, d)
    else:
        t = k.index_select(-2, index).reshape(*lead, c, p, d)
    if p == 1:
        return t.squeeze(-2), t.squeeze(-2).clone()
    a, b, _ = _halves(t, -2)
    hi = select(_cmp_ge(a, b), a, b)
    lo = a + b - hi
    both = crypten.stack([lo, hi])  # [2, ..., c, p/2, d]
    while both.size(-2) > 1:
        a, b, _ = _halves(both, -2)
        hi = select(_cmp_ge(a, b), a, b)
        lo = a + b - hi
        both = crypten.stack([lo[0], hi[1]])
    return both[0].squeeze(-2), both[1].squeeze(-2)


def block_minmax_plain(k: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plaintext twin of :func:`block_minmax`."""
    n, d = k.shape[-2], k.shape[-1]
    index, c, p = _block_index(n, size)
    t = k.index_select(-2, index).reshape(*k.shape[:-2], c, p, d)
    return t.amin(-2), t.amax(-2)


# ------------------------------------------------------------------------------------- linear scores
def linear_block_scores(q: Any, kmin: Any, kmax: Any, alpha: float = 0.6) -> Any:
    """MPCache's linear cluster proxy ``q · (α·kmax + (1−α)·kmin)ᵀ``.

    ``q [..., m, d]`` (decode: ``m = 1``), ``kmin``/``kmax`` ``[..., C, d]`` → ``[..., m, C]``. No
    comparison; one secret matmul (1 round). The centre is ``kmin + α·(kmax − kmin)``: one public-scalar
    truncation (±1 step) plus α's own encoding error (CrypTen truncates α to the fixed-point step) times the
    box width, both times ``‖q‖₁``, plus one truncation of the product.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        r = kmax
    elif alpha == 0.0:
        r = kmin
    else:
        r = kmin + (kmax - kmin) * alpha
    rt = r.transpose(-1, -2)
    if not is_secret(q):
        return rt.transpose(-1, -2).matmul(q.transpose(-1, -2)).transpose(-1, -2)
    return q.matmul(rt)


def linear_block_scores_plain(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, alpha: float = 0.6
) -> torch.Tensor:
    """Plaintext twin of :func:`linear_block_scores`."""
    return q.matmul((alpha * kmax + (1.0 - alpha) * kmin).transpose(-1, -2))
