import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

import mpckv.kernels.page_bounds as pb
from mpckv.kernels._common import is_interpreted
from mpckv.kernels.page_bounds import num_valid_pages, page_minmax, page_upper_bound, update_page_minmax

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCES = ["max", "mean", "sum"]
INF = float("inf")


def _need_triton() -> None:
    pytest.importorskip("triton")
    if not pb.HAS_TRITON or not is_interpreted(pb._page_minmax_kernel):
        pytest.skip("mpckv.kernels was imported before TRITON_INTERPRET=1 was set")


def make_case(L: int, G: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, Hk = 2, 2
    lengths = torch.tensor([[L, (L + 1) // 2], [max(L - 3, 1), 0]])
    k = torch.randn(B, Hk, L, d, generator=gen)
    for b in range(B):
        for hk in range(Hk):
            k[b, hk, int(lengths[b, hk]) :] = float("nan")
    q = torch.randn(B, Hk * G, d, generator=gen)
    return q.to(dtype), k.to(dtype), lengths


def oracle_minmax(k, lengths, page_size):
    B, Hk, L, d = k.shape
    P = math.ceil(L / page_size)
    kmin = torch.full((B, Hk, P, d), INF, dtype=torch.float64)
    kmax = torch.full((B, Hk, P, d), -INF, dtype=torch.float64)
    for b in range(B):
        for hk in range(Hk):
            n = min(int(lengths[b, hk]), L)
            for p in range(P):
                keys = k[b, hk, p * page_size : min(n, (p + 1) * page_size)].double()
                if len(keys):
                    kmin[b, hk, p], kmax[b, hk, p] = keys.amin(0), keys.amax(0)
    return kmin, kmax


def oracle_bound(q, kmin, kmax, n_valid, group_reduce):
    B, H, _ = q.shape
    Hk, P = kmin.shape[1], kmin.shape[2]
    G = H // Hk
    out = torch.full((B, Hk, P), -INF, dtype=torch.float64)
    for b in range(B):
        for hk in range(Hk):
            for p in range(min(int(n_valid[b, hk]), P)):
                us = []
                for h in range(hk * G, hk * G + G):
                    qh = q[b, h].double()
                    us.append(torch.maximum(qh * kmax[b, hk, p].double(), qh * kmin[b, hk, p].double()).sum())
                u = torch.stack(us)
                out[b, hk, p] = {"max": u.max(), "mean": u.mean(), "sum": u.sum()}[group_reduce]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 7, 33, 130])
def test_torch_matches_oracle(L, G, d, dtype):
    q, k, lengths = make_case(L, G, d, dtype)
    for page_size in (1, 4, 16):
        kmin, kmax = page_minmax(k, lengths, page_size, impl="torch")
        omin, omax = oracle_minmax(k, lengths, page_size)
        assert kmin.dtype == torch.float32 and kmin.shape == omin.shape
        assert torch.equal(kmin.double(), omin) and torch.equal(kmax.double(), omax)
        nv = num_valid_pages(lengths, page_size)
        for red in REDUCES:
            u = page_upper_bound(q, kmin, kmax, nv, red, impl="torch")
            assert u.dtype == torch.float32 and u.shape == kmin.shape[:3]
            torch.testing.assert_close(u.double(), oracle_bound(q, kmin, kmax, nv, red), atol=1e-4, rtol=1e-5)


TRITON_CASES = [
    (1, 1, 16, torch.float32),
    (7, 2, 32, torch.float16),
    (7, 4, 16, torch.bfloat16),
    (33, 1, 32, torch.bfloat16),
    (33, 4, 16, torch.float32),
    (130, 2, 16, torch.float16),
    (130, 4, 32, torch.float32),
]


@pytest.mark.parametrize(("L", "G", "d", "dtype"), TRITON_CASES, ids=str)
def test_triton_matches_torch(L, G, d, dtype):
    _need_triton()
    q, k, lengths = make_case(L, G, d, dtype)
    for page_size in (3, 16):
        ref = page_minmax(k, lengths, page_size, impl="torch")
        got = page_minmax(k, lengths, page_size, impl="triton")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        nv = num_valid_pages(lengths, page_size)
        for red in REDUCES:
            u_ref = page_upper_bound(q, *ref, nv, red, impl="torch")
            u_got = page_upper_bound(q, *ref, nv, red, impl="triton")
            assert torch.equal(torch.isinf(u_got), torch.isinf(u_ref))
            torch.testing.assert_close(u_got, u_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("G", [1, 4])
def test_quest_bound_property(impl, G):
    if impl == "triton":
        _need_triton()
    L, d, page_size = 45, 16, 8
    q, k, lengths = make_case(L, G, d, torch.float32, seed=5)
    kmin, kmax = page_minmax(k, lengths, page_size, impl=impl)
    nv = num_valid_pages(lengths, page_size)
    u = page_upper_bound(q, kmin, kmax, nv, "max", impl=impl)
    for b in range(2):
        for hk in range(2):
            n = int(lengths[b, hk])
            assert bool((u[b, hk, int(nv[b, hk]) :] == -INF).all())
            for p in range(int(nv[b, hk])):
                keys = k[b, hk, p * page_size : min(n, (p + 1) * page_size)]
                scores = q[b, hk * G : (hk + 1) * G] @ keys.T  # every head of the group, every key
                assert u[b, hk, p].item() >= scores.max().item() - 1e-5
    # equality when all keys of a page are equal
    k_eq = k.clone()
    for p in range(math.ceil(L / page_size)):
        k_eq[:, :, p * page_size : (p + 1) * page_size] = k[:, :, p * page_size : p * page_size + 1]
    kmin, kmax = page_minmax(k_eq, lengths, page_size, impl=impl)
    u = page_upper_bound(q, kmin, kmax, nv, "max", impl=impl)
    expect = (q.view(2, 2, G, d) @ k_eq[:, :, ::page_size].transpose(-1, -2)).amax(2)
    valid = torch.arange(u.shape[-1]) < nv[..., None]
    torch.testing.assert_close(u[valid], expect[valid], atol=1e-5, rtol=1e-5)


def test_empty_page_inside_valid_range_is_minus_inf():
    kmin = torch.randn(1, 1, 3, 4)
    kmax = kmin + 1
    kmin[0, 0, 1], kmax[0, 0, 1] = INF, -INF
    u = page_upper_bound(torch.zeros(1, 2, 4), kmin, kmax, torch.tensor([[3]]), impl="torch")
    assert u[0, 0, 1] == -INF and torch.isfinite(u[0, 0, [0, 2]]).all()


def test_incremental_update_matches_recompute():
    gen = torch.Generator().manual_seed(7)
    B, Hk, d, page_size = 2, 3, 16, 8
    k = torch.randn(B, Hk, 41, d, generator=gen)
    lengths = torch.tensor([[0, 5, 16], [23, 31, 32]])
    kmin, kmax = page_minmax(k[:, :, :32], lengths, page_size, impl="torch")  # 4 pages
    index = lengths.clone()
    index[0, 1] = -1  # nothing appended for this (b, hk)
    gathered = k[torch.arange(B)[:, None], torch.arange(Hk)[None, :], index.clamp_min(0)]  # [B, Hk, d]
    nmin, nmax = update_page_minmax(kmin, kmax, gathered, index, page_size=page_size)
    assert nmin.shape == (B, Hk, 5, d)  # index 32 -> page 4: grows by one
    new_len = torch.where(index >= 0, lengths + 1, lengths)
    rmin, rmax = page_minmax(k[:, :, :40], new_len, page_size, impl="torch")
    assert torch.equal(nmin, rmin) and torch.equal(nmax, rmax)
    assert torch.equal(kmin, page_minmax(k[:, :, :32], lengths, page_size)[0])  # not in place
    # repeated appends from empty == recompute
    lmin = torch.empty(B, Hk, 0, d)
    lmax = torch.empty(B, Hk, 0, d)
    for t in range(13):
        lmin, lmax = update_page_minmax(lmin, lmax, k[:, :, t], torch.full((B, Hk), t), page_size=page_size)
    rmin, rmax = page_minmax(k[:, :, :13], torch.full((B, Hk), 13), page_size)
    assert torch.equal(lmin, rmin) and torch.equal(lmax, rmax)


def test_validation_errors():
    q, k, lengths = make_case(7, 2, 16, torch.float32)
    with pytest.raises(ValueError):
        page_minmax(k, lengths, 0)
    with pytest.raises(ValueError):
        page_minmax(k, lengths.float(), 4)
    kmin, kmax = page_minmax(k, lengths, 4)
    nv = num_valid_pages(lengths, 4)
    with pytest.raises(ValueError):
        page_upper_bound(q[:, :3], kmin, kmax, nv)
    with pytest.raises(ValueError):
        page_upper_bound(q, kmin, kmax, nv, "median")  # type: ignore[arg-type]
