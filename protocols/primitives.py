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

Costs (2PC CrypTen, ``c`` = one comparison, ``m`` = one multiplication round): :func:`secure_topk` over
``n`` padded to ``N = 2**b`` with ``K`` picks runs the bitonic top-k network of :func:`topk_network_size`
(blocks of ``k' = 2**ceil(log2 K)`` sorted, then merged and truncated; each stage ``c + m``), then ``n``
comparisons, one multiplication and ``K·(n − K + 1)`` equality tests (the band). In 2 parties every
comparison is :func:`ltz` (a packed carry tree, ≈ 5 word-ANDs per element, 7 AND rounds + B2A) and every
equality :func:`eq_zero` (a packed AND tree, ≈ 2 word-ANDs, 6 rounds + B2A) instead of CrypTen's ``lt`` /
``eq``. :func:`block_minmax` costs ``log2 P`` stages (``P`` = block size rounded up to a power of two) and
≈ 1.5 comparisons per key element. :func:`linear_block_scores` is one secret matmul (1 round) and no
comparison. Measured on the tiny model, MPCache's decode-time selection at n = 4000: 3.33 MB per token with
the full sort and CrypTen's comparisons, 1.42 MB with the top-k network, band and packed circuits (same
rounds); ``docs/runs/bench/secure_tiny_methods.json``.

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
    "eq_zero",
    "ltz",
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
    "topk_network_size",
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


def eq_zero(x: Any) -> Any:
    """Bits ``[x == 0]`` (scale 1) of a secret integer tensor ``x`` (scale 1), with a packed AND tree.

    CrypTen's 2-party equality turns the two shares into XOR-sharings of ``s0`` and ``−s1`` (no
    communication), tests all 64 bits of ``~(s0 ⊕ −s1)`` with a ``log2 64 = 6``-level AND tree over
    whole words (6 word-ANDs per element), then converts the bit (B2A). Each level halves the bits that
    matter, so here the surviving half-words of two words are packed into one between levels (masks,
    shifts and XORs of XOR-shares are local): ``1 + 1/2 + … + 1/32 ≈ 2`` word-ANDs per element in the
    same 6 rounds, about half the bytes of ``x.eq(0)``. The bit packing is the standard SIMD trick of
    binary-circuit MPC (e.g. ABY, Demmler et al., NDSS 2015). More than two parties: ``x.eq(0)``.
    """
    crypten = import_crypten()
    comm_ = crypten.communicator.get()
    m = x.numel()
    if int(comm_.get_world_size()) != 2 or m < 2:
        return x.eq(0)
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.binary import BinarySharedTensor

    flat = x.share.reshape(-1)
    z = ~(BinarySharedTensor(flat, src=0) ^ BinarySharedTensor(-flat, src=1))  # all ones iff x == 0
    owner = torch.arange(m).unsqueeze(1)  # [words, lanes]: element held by each lane (-1: padding)
    width = 64
    while width > 1:
        half = width // 2
        z = z & (z >> half)  # one AND round: every lane's low half ANDed with its high half
        lanes = 64 // width
        low = sum(((1 << half) - 1) << (j * width) for j in range(lanes))
        z.share = z.share & _as_int64(low)  # keep each lane's low half (local)
        width = half
        if width == 1:
            break
        if z.share.numel() % 2:  # pad with a public zero word
            z.share = torch.cat([z.share, torch.zeros(1, dtype=torch.long, device=z.share.device)])
            owner = torch.cat([owner, torch.full((1, owner.shape[1]), -1, dtype=torch.long)])
        z.share = z.share[0::2] ^ (z.share[1::2] << width)  # lanes of two words into one (local)
        owner = torch.stack([owner[0::2], owner[1::2]], dim=-1).reshape(owner.shape[0] // 2, -1)
    pos = torch.arange(owner.shape[1], device=z.share.device) * 2  # final lane l holds its bit at 2·l
    bits = (z.share.unsqueeze(1) >> pos.unsqueeze(0)) & 1  # [words, lanes], XOR-shares of the bits
    keep = (owner.reshape(-1) >= 0).to(z.share.device)
    order = torch.argsort(owner.reshape(-1)[owner.reshape(-1) >= 0]).to(z.share.device)
    xb = z.shallow_copy()
    xb.share = bits.reshape(-1)[keep][order]
    arith = beaver.B2A_single_bit(xb)
    return _from_share(arith.share.reshape(x.share.shape), 0)


_EVEN = 0x5555555555555555


def _compact_even_bits(t: torch.Tensor) -> torch.Tensor:
    """Move the bits at even positions of every int64 to the low 32 bits, in order (local; XOR-linear)."""
    t = t & _as_int64(_EVEN)
    for shift, mask in (
        (1, 0x3333333333333333),
        (2, 0x0F0F0F0F0F0F0F0F),
        (4, 0x00FF00FF00FF00FF),
        (8, 0x0000FFFF0000FFFF),
        (16, 0x00000000FFFFFFFF),
    ):
        t = (t ^ (t >> shift)) & _as_int64(mask)
    return t


def ltz(x: Any) -> Any:
    """Bits ``[x < 0]`` (scale 1) of a secret tensor: its sign bit, by a packed carry tree (2 parties).

    The sign of ``x = s0 + s1 (mod 2**64)`` is ``s0₆₃ ⊕ s1₆₃ ⊕ c₆₃`` with ``c₆₃`` the carry into bit 63.
    The two shares become XOR-sharings (no communication); generate/propagate bits ``g = s0 ∧ s1``,
    ``p = s0 ⊕ s1`` (bit 63: ``g = 0, p = 1`` so that the carry-out of all 64 groups is ``c₆₃``) are
    combined pairwise, ``(G, P) = (G_hi ⊕ P_hi·G_lo, P_hi·P_lo)``, six times (a Brent–Kung/Sklansky
    prefix tree reduced to its root). After every level the surviving bits of each element are compacted
    (local bit shuffles) and two words packed into one, so the ANDs cost ``≈ 1 + 2·(1 + 1/2 + …) ≈ 5``
    words per element instead of CrypTen's full-width adder (``lt``), in 7 AND rounds plus one B2A.
    More than two parties: ``x.lt(0)``.
    """
    crypten = import_crypten()
    comm_ = crypten.communicator.get()
    m = x.numel()
    if int(comm_.get_world_size()) != 2 or m < 2:
        return x.lt(0)
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.binary import BinarySharedTensor

    rank = int(comm_.get_rank())
    flat = x.share.reshape(-1)
    a = BinarySharedTensor(flat, src=0)
    b = BinarySharedTensor(flat, src=1)
    p = a ^ b
    sign = (p.share >> 63) & 1  # XOR-shares of s0₆₃ ⊕ s1₆₃
    g = a & b  # one AND round
    top = _as_int64(1 << 63)
    g.share = g.share & ~top
    p.share = (p.share & ~top) ^ (top if rank == 0 else 0)  # p₆₃ = 1 (public)
    owner = torch.arange(m).unsqueeze(1)
    lanes_w = 64
    while lanes_w > 1:
        hi_g, hi_p = g.shallow_copy(), p.shallow_copy()
        hi_g.share, hi_p.share = g.share >> 1, p.share >> 1
        both = BinarySharedTensor.stack([hi_p, hi_p]) & BinarySharedTensor.stack([g, p])  # one AND round
        g.share = _compact_even_bits(hi_g.share ^ both.share[0])
        p.share = _compact_even_bits(both.share[1])
        lanes_w //= 2
        if lanes_w == 1:
            break
        if g.share.numel() % 2:
            pad = torch.zeros(1, dtype=torch.long, device=g.share.device)
            g.share, p.share = torch.cat([g.share, pad]), torch.cat([p.share, pad])
            owner = torch.cat([owner, torch.full((1, owner.shape[1]), -1, dtype=torch.long)])
        g.share = g.share[0::2] ^ (g.share[1::2] << 32)
        p.share = p.share[0::2] ^ (p.share[1::2] << 32)
        owner = torch.cat([owner[0::2], owner[1::2]], dim=1)
    bits = (g.share.unsqueeze(1) >> torch.arange(owner.shape[1], device=g.share.device).unsqueeze(0)) & 1
    keep = (owner.reshape(-1) >= 0).to(g.share.device)
    order = torch.argsort(owner.reshape(-1)[owner.reshape(-1) >= 0]).to(g.share.device)
    xb = g.shallow_copy()
    xb.share = bits.reshape(-1)[keep][order] ^ sign
    arith = beaver.B2A_single_bit(xb)
    return _from_share(arith.share.reshape(x.share.shape), 0)


def _as_int64(value: int) -> int:
    """``value`` (``< 2**64``) as a signed int64 bit pattern."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _cmp_ge(a: Any, b: Any) -> Any:
    """Bits ``a >= b`` (scale 1): one comparison over the broadcast shape."""
    return 1 - ltz(a - b)


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


TOPK_NETWORKS = ("bitonic", "rank", "sort")
"""Ways :func:`secure_topk` finds the selected entries: few bytes (``bitonic``: a top-k network), few
rounds (``rank``: all pairs at once), or the full bitonic sort (``sort``: the reference network)."""


def topk_network_size(n: int, k: int, network: str = "bitonic") -> dict[str, int]:
    """Public cost of the comparison network of :func:`secure_topk` for one row: comparisons and depth.

    Counts the network only (not the final ``n`` threshold comparisons or the one-hot equalities).
    """
    if n <= 1 or k <= 0:
        return {"comparisons": 0, "stages": 0}
    if network == "rank":
        return {"comparisons": n * (n - 1) // 2, "stages": 1}
    b = max(1, math.ceil(math.log2(n)))
    npad = 1 << b
    kp = npad if network == "sort" else min(npad, 1 << max(0, math.ceil(math.log2(min(k, n)))))
    lk = kp.bit_length() - 1
    comps = npad // 2 * lk * (lk + 1) // 2
    stages = lk * (lk + 1) // 2
    length = npad
    while length > kp:
        comps += length // 2 + length // 4 * lk
        stages += 1 + lk
        length //= 2
    return {"comparisons": comps, "stages": stages}


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
        ``"bitonic"`` (default): a bitonic **top-k network** — sort blocks of ``k' = 2**ceil(log2 K)``,
        then merge-and-truncate pairs of blocks (the elementwise maximum of a descending and an ascending
        sorted block is a bitonic sequence holding their top ``k'``; a bitonic merge sorts it), halving the
        row until one sorted block of ``k'`` is left: ``≈ N/4·log²k' + N·(1 + log k')/2`` comparisons in
        ``log k'·(log k' + 1)/2 + log(N/k')·(1 + log k')`` stages instead of the full sort's
        ``N/4·log N·(log N + 1)`` (``"sort"``). Then one comparison per entry against the ``kk``-th key.
        ``"rank"``: every pair compared at once (``n(n − 1)/2`` comparisons in *one* stage), each entry's
        rank summed locally, then one comparison ``rank < kk`` — the same selection in two comparison
        depths instead of ``≈ log²n/2``, for ``≈ 2n/log²n`` times the comparisons. Prefer it where
        round trips cost more than bytes (WAN) and rows are short (tens to a few hundred entries).
        :func:`topk_network_size` gives the public network sizes.

    Returns
    -------
    Secret ``[..., K, n]`` bits (scale-1 encoding), ``K = max over rows of min(n, max(k, #forced))``.
    Row ``r`` of a slice is the one-hot of its ``r``-th selected index in **ascending index order**;
    rows past the row's own budget are zero — the same as :func:`topk_onehot_plain`. Ties in the
    fixed-point scores go to the lower index.

    Method: keys ``score·2**b + (N−1−i)`` (``N = 2**b ≥ n``; forced entries get ``+2**(b+40)``, padding
    ``−2**(b+40)``) are all distinct; the network finds the row's ``kk``-th largest key, which becomes a
    threshold, ``sel = key >= threshold``, the exclusive prefix sum of ``sel`` is each selected entry's
    output row (``slot``), and equality tests ``slot == r`` build the one-hot. Only the *band* of entries
    that can hold row ``r`` is tested — entry ``i`` can be the ``r``-th pick only if ``r ≤ i ≤ n − kk + r``
    — so a uniform budget costs ``K·(n − K + 1)`` equalities instead of ``K·n`` (half at ``K = n/2``).

    References: the bitonic merger is Batcher's (*Sorting networks and their applications*, AFIPS 1968);
    truncating merges to a top-k is the classic selection-network construction (Knuth, TAOCP vol. 3,
    §5.3.4); sorting networks as data-oblivious MPC protocols: Jónsson, Kreitz, Uddin (*Secure
    multi-party sorting and applications*, IACR ePrint 2011/122) and Hamada et al. (ICISC 2012). The
    band restriction of the one-hot is ours. All of it is CrypTen comparisons, products and local share
    operations.
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
    kmin = int(kk.min())
    if kmin == n:  # every entry of every row is selected: a public choice (no comparison)
        sel = _from_share(_add_public(torch.zeros_like(key_share), torch.ones_like(key_share)), 0)
    elif network == "rank":
        sel = _rank_select(_from_share(key_share, 0), kk)
    else:
        if npad > n:
            pad_pub = torch.full((*lead, npad - n), -big, dtype=torch.long)
            key_share = torch.cat([key_share, _add_public(torch.zeros_like(pad_pub), pad_pub)], dim=-1)
        keys = _from_share(key_share, 0)
        kp = npad if network == "sort" else min(npad, 1 << max(0, math.ceil(math.log2(kmax))))
        best = _bitonic_topk_desc(keys, npad, kp)  # [..., kp] descending
        thr = best.gather(-1, (kk - 1).clamp_min(0).unsqueeze(-1))  # [..., 1]
        sel = 1 - ltz(keys[..., :n] - thr)  # key >= threshold
    if kmin == 0:  # rows with nothing to select
        sel = sel * (kk > 0).long().unsqueeze(-1)
    excl = sel.clone()
    excl.share = sel.share.cumsum(-1) - sel.share
    slot = sel * (excl + 1) - 1  # output row of a selected entry, -1 elsewhere (exact: scale 1)
    return _slot_onehot(slot, kk, kmax, lead, n)


def _slot_onehot(slot: Any, kk: torch.Tensor, kmax: int, lead: torch.Size, n: int) -> Any:
    """Bits ``[..., kmax, n]``: ``[slot_i == r]``, tested only on the band ``r ≤ i ≤ n − kk + r``."""
    kmin = int(kk.min())
    rows = torch.arange(kmax, dtype=torch.long)
    width = n - kmin + 1
    if kmin != kmax or width >= n:  # ragged budgets (or K = 1): test every entry
        r = rows.view(*([1] * len(lead)), kmax, 1)
        return eq_zero(slot.unsqueeze(-2).expand(*lead, kmax, n) - r.expand(*lead, kmax, n))
    cols = rows[:, None] + torch.arange(width)[None, :]  # [K, width], all < n
    band = slot[..., cols.reshape(-1)].reshape(*lead, kmax, width)
    bits = eq_zero(band - rows[:, None].expand(kmax, width).expand(*lead, kmax, width))
    out = torch.zeros(*lead, kmax, n, dtype=torch.long)
    out.scatter_(-1, cols.expand(*lead, kmax, width), bits.share)
    return _from_share(out, 0)


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
        g = 1 - ltz(keys[..., second] - keys[..., first])  # key_second > key_first (keys distinct)
        gs = g.share
        zeros = torch.zeros_like(keys.share)
        rank_share = zeros.scatter_add(-1, first.expand_as(gs), gs) - zeros.scatter_add(
            -1, second.expand_as(gs), gs
        )
        rank_share = _add_public(rank_share, torch.arange(n).expand_as(rank_share))  # + #(j < i)
    rank = _from_share(_add_public(rank_share, -kk.unsqueeze(-1).expand_as(rank_share)), 0)
    return ltz(rank)  # rank − kk < 0


def _compare_exchange(keys: Any, first: torch.Tensor, second: torch.Tensor, desc: torch.Tensor) -> Any:
    """One network stage: pairs ``(first, second)`` of the last dim put in order (``desc`` per pair).

    One comparison and one multiplication per pair; ``first`` ∪ ``second`` must cover the last dim.
    """
    crypten = import_crypten()
    a = keys[..., first]
    bb = keys[..., second]
    lt = ltz(a - bb)  # a < b
    swap = lt.clone()
    swap.share = lt.share * (2 * desc - 1)
    swap.share = _add_public(swap.share, (1 - desc).expand_as(lt.share))
    new_a = a + swap * (bb - a)
    new_b = a + bb - new_a
    inv = torch.argsort(torch.cat([first, second]))
    return crypten.cat([new_a, new_b], dim=-1)[..., inv]


def _bitonic_merge(keys: Any, size: int) -> Any:
    """Sort every bitonic block of ``size`` of the last dim: block ``j`` descending iff ``j`` is even."""
    idx = torch.arange(keys.size(-1))
    stride = size // 2
    while stride >= 1:
        first = idx[(idx & stride) == 0]
        keys = _compare_exchange(keys, first, first + stride, ((first & size) == 0).long())
        stride //= 2
    return keys


def _bitonic_topk_desc(keys: Any, npad: int, kp: int) -> Any:
    """The ``kp`` largest of distinct scale-1 keys ``[..., npad]``, sorted descending: ``[..., kp]``.

    Blocks of ``kp`` are sorted (alternating directions), then pairs of blocks are merged and truncated
    (elementwise maximum of a descending and an ascending block: a bitonic block of their top ``kp``,
    sorted again by a bitonic merge) until one block is left. ``kp = npad`` is the full bitonic sort.
    """
    size = 2
    while size <= kp:
        keys = _bitonic_merge(keys, size)
        size *= 2
    length = npad
    lead = tuple(keys.size()[:-1])
    while length > kp:
        pairs = keys.reshape(*lead, length // (2 * kp), 2, kp)
        a, b = pairs[..., 0, :], pairs[..., 1, :]  # a descending, b ascending
        top = select(_cmp_ge(a, b), a, b)  # bitonic, the top kp of the pair
        length //= 2
        keys = _bitonic_merge(top.reshape(*lead, length), kp)
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
