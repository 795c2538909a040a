"""Secure selection primitives (mpckv.protocols.primitives) against their plaintext twins.

Runs in real CrypTen parties: 2-party beaver/TFP (property tests), one 3-party ``replicated`` case and
one dealer (TTP) case. Tolerances are in ``LSB = 2**-16``; selections must be *identical* whenever the
score gaps exceed the scoring tolerance (ties in the fixed-point scores go to the lower index on both
sides).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mpckv.errors import ConfigError, ShapeError
from mpckv.protocols import numerics as N
from mpckv.protocols import primitives as P
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.testing import assert_check_passed, party_settings, register_checks

LSB = 2.0**-16


def _enc(x: torch.Tensor):
    X = import_crypten().cryptensor(x)
    return X, X.get_plain_text().to(x.dtype)


def _distinct_scores(g: torch.Generator, shape: tuple[int, ...], gap: float) -> torch.Tensor:
    n = shape[-1]
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(int(torch.tensor(shape[:-1]).prod()))])
    base = (torch.rand(perm.shape[0], 1, generator=g) - 0.5) * 200
    return (perm.float() * gap + base).reshape(shape)


def _assert_topk_equal(S, sq, k, forced):
    """Both networks (bitonic sort, pairwise rank) give exactly the plaintext one-hot."""
    ref = P.topk_onehot_plain(sq, k, forced)
    for network in P.TOPK_NETWORKS:
        got = P.secure_topk(S, k, forced, network=network).get_plain_text()
        assert got.shape == ref.shape, (network, got.shape, ref.shape)
        assert torch.equal(got.long(), ref.long()), (network, got, ref)
        # structure: one 1 per used row, indices ascending, no index twice
        assert got.sum(-1).le(1).all() and got.sum(-2).le(1).all()


# ------------------------------------------------------------------------------------------ top-k
def check_topk_property():
    @party_settings(max_examples=8)
    @given(
        seed=st.integers(0, 2**16),
        rows=st.integers(1, 2),
        n=st.integers(1, 24),
        k=st.integers(0, 26),
        gap=st.sampled_from([2.0**-10, 0.01, 1.0]),
        forced_p=st.sampled_from([0.0, 0.1, 0.5]),
    )
    def prop(seed, rows, n, k, gap, forced_p):
        g = torch.Generator().manual_seed(seed)
        s = _distinct_scores(g, (rows, n), gap)
        forced = (torch.rand(rows, n, generator=g) < forced_p) if forced_p else None
        S, sq = _enc(s)
        _assert_topk_equal(S, sq, k, forced)

    prop()


def check_topk_ties_and_edges():
    g = torch.Generator().manual_seed(7)
    ties = torch.randint(0, 3, (2, 12), generator=g).float()  # many exact ties: lower index wins
    S, sq = _enc(ties)
    forced = torch.zeros(2, 12, dtype=torch.bool)
    forced[0, 11] = forced[1, 0] = True
    _assert_topk_equal(S, sq, 5, None)
    _assert_topk_equal(S, sq, 5, forced)
    _assert_topk_equal(S, sq, 0, forced)  # forced entries only
    many = torch.zeros(2, 12, dtype=torch.bool)
    many[0, :7] = True  # more forced than k in one row: that row keeps 7, the other 3
    _assert_topk_equal(S, sq, 3, many)
    _assert_topk_equal(S, sq, 40, None)  # k > n: everything, in index order
    one, oq = _enc(torch.tensor([[0.25]]))
    _assert_topk_equal(one, oq, 1, None)
    lead, lq = _enc(_distinct_scores(g, (2, 2, 16), 0.5))  # power-of-two n, two lead dims
    _assert_topk_equal(lead, lq, 4, None)
    empty = P.secure_topk(S, 0).get_plain_text()
    assert empty.shape == (2, 0, 12)


def check_topk_network_longer_rows():
    """Rows long enough for several merge-and-truncate levels, with a uniform budget (banded one-hot)."""
    g = torch.Generator().manual_seed(5)
    for n, k in ((100, 7), (64, 32), (37, 16), (33, 1)):
        S, sq = _enc(_distinct_scores(g, (2, n), 0.01))
        ref = P.topk_onehot_plain(sq, k)
        for network in ("bitonic", "sort"):
            got = P.secure_topk(S, k, network=network).get_plain_text()
            assert torch.equal(got.long(), ref.long()), (n, k, network)


def check_packed_equality():
    """eq_zero == (x == 0) on small, large and negative integers, for fewer bytes than CrypTen's eq."""
    from mpckv.protocols import comm

    crypten = import_crypten()
    g = torch.Generator().manual_seed(9)
    for m in (2, 3, 37, 130):
        x = torch.randint(-3, 4, (m,), generator=g)
        x[: m // 3] *= torch.randint(1, 2**40, (m // 3,), generator=g)  # large magnitudes too
        X = P._from_share(P._add_public(torch.zeros(m, dtype=torch.long), x), 0)
        X = X + crypten.cryptensor(torch.zeros(m), precision=0)  # re-randomise the shares
        comm.install()
        before = comm.snapshot().bytes_total
        got = P.eq_zero(X)
        mid = comm.snapshot().bytes_total
        ref = X.eq(0)
        after = comm.snapshot().bytes_total
        assert torch.equal(got.get_plain_text().long(), (x == 0).long()), (m, x)
        assert torch.equal(ref.get_plain_text().long(), (x == 0).long())
        if m >= 37:
            assert mid - before < 0.6 * (after - mid), (mid - before, after - mid)


def check_packed_sign():
    """ltz == (x < 0) on random ring elements, extremes and fixed-point values, for fewer bytes than lt."""
    from mpckv.protocols import comm

    crypten = import_crypten()
    g = torch.Generator().manual_seed(10)
    comm.install()
    for m in (2, 5, 64, 131):
        x = torch.randint(-(2**62), 2**62, (m,), generator=g, dtype=torch.long)
        x[: m // 4] = torch.randint(-3, 3, (m // 4,), generator=g)
        x[0], x[1] = -(2**62), 2**62 - 1
        X = P._from_share(P._add_public(torch.zeros(m, dtype=torch.long), x), 0)
        X = X + crypten.cryptensor(torch.zeros(m), precision=0)  # re-randomise the shares
        before = comm.snapshot().bytes_total
        got = P.ltz(X)
        mid = comm.snapshot().bytes_total
        ref = X.lt(0)
        after = comm.snapshot().bytes_total
        assert torch.equal(got.get_plain_text().long(), (x < 0).long()), (m, x)
        assert torch.equal(ref.get_plain_text().long(), (x < 0).long())
        if m >= 64:
            assert mid - before < 0.6 * (after - mid), (mid - before, after - mid)
    F, fq = _enc(torch.randn(3, 7, generator=g) * 100)
    assert torch.equal(P.ltz(F).get_plain_text().long(), (fq < 0).long())


def check_tree_max_select_and_sharing():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 37, generator=g) * 50
    X, xq = _enc(x)
    assert torch.equal(P.tree_max(X, -1).get_plain_text(), xq.amax(-1))
    assert torch.equal(P.tree_max(X, 0, keepdim=True).get_plain_text(), xq.amax(0, keepdim=True))
    Y, yq = _enc(torch.randn(3, 37, generator=g))
    mask = torch.rand(3, 37, generator=g) > 0.5
    assert torch.equal(P.select(mask, X, Y).get_plain_text(), torch.where(mask, xq, yq))  # public
    bits = X > Y
    assert torch.equal(P.select(bits, X, Y).get_plain_text(), torch.maximum(xq, yq))  # secret bits
    assert torch.equal(P.to_fixed(bits).get_plain_text(), (xq > yq).double())
    v = torch.tensor([1.5, -2.25, 2.0**-16])
    assert torch.equal(P.public_to_shared(v).get_plain_text(), v.double())
    assert torch.equal(
        P.public_to_shared(torch.tensor([3, -1]), precision=0).get_plain_text(), torch.tensor([3, -1])
    )


# ---------------------------------------------------------------------------- block bounds, scores
def check_block_minmax_property():
    @party_settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**16),
        n=st.integers(1, 40),
        d=st.integers(1, 4),
        size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    )
    def prop(seed, n, d, size):
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(2, n, d, generator=g) * 3
        K, kq = _enc(k)
        mn, mx = P.block_minmax(K, size)
        rmn, rmx = P.block_minmax_plain(kq, size)
        assert torch.equal(mn.get_plain_text(), rmn) and torch.equal(mx.get_plain_text(), rmx)

    prop()


def check_linear_block_scores_property():
    @party_settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**16),
        c=st.integers(1, 12),
        d=st.sampled_from([4, 16, 64]),
        alpha=st.sampled_from([0.0, 0.5, 0.6, 1.0]),
        public_q=st.booleans(),
    )
    def prop(seed, c, d, alpha, public_q):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 1, d, generator=g) * 2
        lo = torch.randn(2, c, d, generator=g) * 3
        hi = lo + torch.rand(2, c, d, generator=g) * 4
        Q, qq = _enc(q)
        Lo, loq = _enc(lo)
        Hi, hiq = _enc(hi)
        out = P.linear_block_scores(qq.float() if public_q else Q, Lo, Hi, alpha).get_plain_text()
        # CrypTen encodes the public α by truncation to the fixed-point step: the reference uses that α
        # (the centre is lo + α·(hi − lo)), so what is left is truncation error
        a_enc = math.trunc(alpha / LSB) * LSB
        hd, ld = hiq.double(), loq.double()
        ref = (qq.double() @ (ld + a_enc * (hd - ld)).transpose(-1, -2)).to(out.dtype)
        assert torch.allclose(ref, P.linear_block_scores_plain(qq, loq, hiq, alpha).to(out.dtype), atol=1e-2)
        # one public-scalar truncation on the box centre times |q|_1, plus the product truncation
        tol = (2 * qq.abs().sum(-1, keepdim=True) + 2 + (d if public_q else 0)) * LSB
        assert ((out - ref).abs() <= tol).all()

    prop()


def check_onehot_gather_exact():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, 6, generator=g) * 10
    X, xq = _enc(x)
    S, _ = _enc(_distinct_scores(g, (2, 10), 0.1))
    oh = P.secure_topk(S, 3)
    ohq = oh.get_plain_text()
    ref = P.onehot_gather_plain(ohq, xq)
    assert torch.equal(P.onehot_gather(oh, X).get_plain_text(), ref)  # secret bits: exact
    assert torch.equal(P.onehot_gather(ohq, X).get_plain_text(), ref)  # public one-hot: local, exact
    fixed = P.onehot_gather(P.to_fixed(oh), X).get_plain_text()
    assert (fixed - ref).abs().max() <= 2 * LSB  # fixed-point one-hot: one truncation


def _pipeline(seed: int, heads: int, n: int, d: int, size: int, k: int, require=assume) -> None:
    """MPCache-style step: block boxes → linear proxy → cluster top-k (sink + last forced) → gather."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, n, d, generator=g)
    q = torch.randn(heads, 1, d, generator=g)
    K, kq = _enc(keys)
    Q, qq = _enc(q)
    mn, mx = P.block_minmax(K, size)
    scores = P.linear_block_scores(Q, mn, mx, 0.6)  # [h, 1, C]
    c = scores.size(-1)
    rmn, rmx = P.block_minmax_plain(kq, size)
    ref_scores = P.linear_block_scores_plain(qq, rmn, rmx, 0.6)
    srt = ref_scores.sort(-1, descending=True).values
    tol = float(2 * qq.abs().sum(-1).max() + 2) * LSB
    require(bool((srt[..., :-1] - srt[..., 1:]).min() > 2 * tol) if c > 1 else True)
    forced = torch.zeros(heads, 1, c, dtype=torch.bool)
    forced[..., 0] = forced[..., -1] = True
    oh = P.secure_topk(scores, k, forced)  # [h, 1, K, C]
    ref_oh = P.topk_onehot_plain(ref_scores, k, forced)
    assert torch.equal(oh.get_plain_text().long(), ref_oh.long())
    # gather whole clusters: K̃ = K[:C·size] viewed [C, size·d]
    full = (n // size) * size
    if full == c * size:
        kt = K[:, :full].reshape(heads, 1, c, size * d)
        got = P.onehot_gather(oh, kt).get_plain_text()
        ref = P.onehot_gather_plain(ref_oh, kq[:, :full].reshape(heads, 1, c, size * d))
        assert torch.equal(got, ref)


def check_mpcache_pipeline_property():
    @party_settings(max_examples=5)
    @given(
        seed=st.integers(0, 2**16),
        heads=st.integers(1, 2),
        blocks=st.integers(2, 8),
        size=st.sampled_from([2, 4, 8]),
        k=st.integers(1, 4),
    )
    def prop(seed, heads, blocks, size, k):
        _pipeline(seed, heads, blocks * size, 8, size, k)

    prop()


# ------------------------------------------------------------------------- 3 parties and a dealer
def _require(ok: bool) -> None:
    assert ok, "fixed example has score gaps below the tolerance"


def check_small_topk_pipeline_and_softmax():
    g = torch.Generator().manual_seed(11)
    S, sq = _enc(_distinct_scores(g, (2, 10), 0.05))
    forced = torch.zeros(2, 10, dtype=torch.bool)
    forced[:, 0] = True
    _assert_topk_equal(S, sq, 3, forced)
    _pipeline(seed=4, heads=1, n=16, d=4, size=4, k=2, require=_require)
    x = torch.randn(2, 24, generator=g) * 4
    X, xq = _enc(x)
    keep = torch.rand(2, 24, generator=g) > 0.4
    err = (N.softmax(X, keep=keep).get_plain_text() - N.softmax_plain(xq, keep=keep)).abs().max()
    assert err <= 16 * LSB, float(err / LSB)


CHECKS_2PC = [
    check_topk_property,
    check_topk_network_longer_rows,
    check_packed_equality,
    check_packed_sign,
    check_topk_ties_and_edges,
    check_tree_max_select_and_sharing,
    check_block_minmax_property,
    check_linear_block_scores_property,
    check_onehot_gather_exact,
    check_mpcache_pipeline_property,
]
CHECKS_SMALL = [check_small_topk_pipeline_and_softmax]
register_checks("2pc", CHECKS_2PC, world_size=2, timeout=400)
register_checks("3pc-replicated", CHECKS_SMALL, world_size=3, protocol="replicated", timeout=300)
register_checks("2pc-ttp", CHECKS_SMALL, world_size=2, ttp=True, timeout=300)


@pytest.mark.mpc
@pytest.mark.parametrize("check", CHECKS_2PC, ids=lambda c: c.__name__)
def test_primitives_in_two_parties(check):
    assert_check_passed("2pc", check)


@pytest.mark.mpc
def test_primitives_in_three_parties_replicated():
    assert_check_passed("3pc-replicated", check_small_topk_pipeline_and_softmax)


@pytest.mark.mpc
def test_primitives_with_a_dealer():
    assert_check_passed("2pc-ttp", check_small_topk_pipeline_and_softmax)


# ----------------------------------------------------------------------------- plaintext / checks
def test_plain_twins():
    k = torch.arange(10.0).view(1, 5, 2)
    mn, mx = P.block_minmax_plain(k, 2)  # blocks {0,1}, {2,3}, {4}
    assert torch.equal(mn, torch.tensor([[[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]]]))
    assert torch.equal(mx, torch.tensor([[[2.0, 3.0], [6.0, 7.0], [8.0, 9.0]]]))
    oh = P.topk_onehot_plain(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2)
    assert torch.equal(oh, torch.tensor([[[0, 1, 0, 0], [0, 0, 0, 1]]]))
    sc = P.linear_block_scores_plain(torch.ones(1, 1, 2), mn, mx, 0.5)
    assert torch.allclose(sc, torch.tensor([[[3.0, 11.0, 17.0]]]))


def test_topk_network_size_is_smaller_than_the_sort():
    """The top-k network's comparison count: the full sort's formula for k ≥ N, fewer below."""
    for n in (16, 100, 256, 4096):
        b = math.ceil(math.log2(n))
        sort = P.topk_network_size(n, n, "sort")
        assert sort == {"comparisons": (1 << b) // 2 * b * (b + 1) // 2, "stages": b * (b + 1) // 2}
        assert P.topk_network_size(n, n, "bitonic") == sort
        prev = sort["comparisons"]
        for k in sorted({n // 2, n // 8, 2}, reverse=True):
            cur = P.topk_network_size(n, k, "bitonic")["comparisons"]
            assert cur < prev, (n, k)
            prev = cur
    assert P.topk_network_size(10, 3, "rank") == {"comparisons": 45, "stages": 1}
    assert P.topk_network_size(1, 1) == {"comparisons": 0, "stages": 0}


def test_argument_errors():
    s = torch.zeros(2, 5)
    with pytest.raises(ShapeError):
        P.secure_topk(s, 2, forced=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ConfigError):
        P.secure_topk(s, -1)
    with pytest.raises(ConfigError, match="network must be one of"):
        P.secure_topk(s, 2, network="odd-even")
    with pytest.raises(ConfigError):
        P.block_minmax_plain(torch.zeros(1, 4, 2), 0)
    with pytest.raises(ConfigError):
        P.linear_block_scores(None, None, None, alpha=1.5)
