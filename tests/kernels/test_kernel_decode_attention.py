import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import mpckv.kernels.decode_attention as da
from mpckv.kernels._common import is_interpreted
from mpckv.kernels.decode_attention import decode_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _need_triton() -> None:
    pytest.importorskip("triton")
    if not da.HAS_TRITON or not is_interpreted(da._decode_partial_kernel):
        pytest.skip("mpckv.kernels was imported before TRITON_INTERPRET=1 was set")


def make_case(L: int, G: int, d: int, dtype: torch.dtype, seed: int = 0, dv: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    B, Hk = 2, 2
    lengths = torch.tensor([[L, (L + 1) // 2], [max(L - 3, 1), 0]])
    k = torch.randn(B, Hk, L, d, generator=gen) * 1.5
    v = torch.randn(B, Hk, L, dv or d, generator=gen)
    for b in range(B):
        for hk in range(Hk):
            k[b, hk, int(lengths[b, hk]) :] = float("nan")
            v[b, hk, int(lengths[b, hk]) :] = float("nan")
    q = torch.randn(B, Hk * G, d, generator=gen)
    keep = torch.rand(B, Hk, L, generator=gen) > 0.3
    keep[0, 0] = False  # a row with nothing kept
    return q.to(dtype), k.to(dtype), v.to(dtype), lengths, keep


def oracle(q, k, v, lengths, scale, keep):
    """Explicit loop over (b, h) with the list of visible indices, float64."""
    B, H, _ = q.shape
    Hk, L, dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    out = torch.zeros(B, H, dv, dtype=torch.float64)
    probs = torch.zeros(B, H, L, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // G
            idx = [j for j in range(min(int(lengths[b, hk]), L)) if keep is None or bool(keep[b, hk, j])]
            if not idx:
                continue
            p = torch.softmax(k[b, hk, idx].double() @ q[b, h].double() * scale, dim=0)
            probs[b, h, idx] = p
            out[b, h] = p @ v[b, hk, idx].double()
    return out, probs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 7, 33, 130])
def test_torch_matches_oracle(L, G, d, dtype):
    q, k, v, lengths, keep = make_case(L, G, d, dtype)
    sc = d**-0.5
    for kp in (None, keep):
        out, probs = decode_attention(q, k, v, lengths, scale=sc, return_probs=True, keep=kp, impl="torch")
        o_ref, p_ref = oracle(q, k, v, lengths, d**-0.5, kp)
        assert out.dtype == dtype and out.shape == (2, 2 * G, d)
        assert probs is not None and probs.dtype == torch.float32 and probs.shape == (2, 2 * G, L)
        torch.testing.assert_close(out.double(), o_ref, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
        torch.testing.assert_close(probs.double(), p_ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(probs == 0, p_ref == 0)
        out2, none = decode_attention(q, k, v, lengths, scale=d**-0.5, keep=kp, impl="torch")
        assert none is None and torch.equal(out2, out)


TRITON_CASES = [
    (1, 1, 16, torch.float32),
    (1, 2, 32, torch.bfloat16),
    (7, 4, 16, torch.float16),
    (7, 1, 32, torch.float32),
    (33, 2, 16, torch.bfloat16),
    (33, 4, 32, torch.float32),
    (130, 1, 32, torch.float16),
    (130, 2, 16, torch.float32),
    (130, 4, 16, torch.bfloat16),
]


@pytest.mark.parametrize(("L", "G", "d", "dtype"), TRITON_CASES, ids=str)
def test_triton_matches_torch(L, G, d, dtype):
    _need_triton()
    q, k, v, lengths, keep = make_case(L, G, d, dtype)
    tol = OUT_TOL[dtype] if dtype != torch.float32 else 2e-6
    sc = d**-0.5
    for kp in (None, keep):
        o_ref, p_ref = decode_attention(q, k, v, lengths, scale=sc, return_probs=True, keep=kp, impl="torch")
        out, probs = decode_attention(q, k, v, lengths, scale=sc, return_probs=True, keep=kp, impl="triton")
        assert out.dtype == dtype and probs is not None
        torch.testing.assert_close(out.float(), o_ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(probs, p_ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(probs == 0, p_ref == 0)
    out3, none = decode_attention(q, k, v, lengths, scale=d**-0.5, keep=keep, impl="triton")
    assert none is None and torch.equal(out3, out)


@pytest.mark.parametrize("num_splits", [1, 3, 20])
def test_triton_split_l_and_dv(num_splits):
    """Several L splits (incl. splits past every length), small blocks, dv != d, odd d."""
    _need_triton()
    q, k, v, lengths, keep = make_case(70, 2, 24, torch.float32, seed=4, dv=40)
    k = torch.cat([k, torch.randn_like(k)], dim=-1)[..., :24]  # non-contiguous views
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    o_ref, p_ref = decode_attention(q, k, v, lengths, scale=0.2, return_probs=True, keep=keep, impl="torch")
    out, probs = da._decode_attention_triton(q, k, v, lengths, 0.2, True, keep, num_splits, 16)
    assert out.shape == (2, 4, 40)
    torch.testing.assert_close(out, o_ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(probs, p_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_rows_and_normalisation(impl):
    if impl == "triton":
        _need_triton()
    q, k, v, lengths, keep = make_case(33, 2, 16, torch.float32, seed=2)
    out, probs = decode_attention(q, k, v, lengths, scale=0.25, return_probs=True, keep=keep, impl=impl)
    assert probs is not None
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    # (b=0, hk=0): nothing kept; (b=1, hk=1): length 0  -> zeros
    for b, hk in ((0, 0), (1, 1)):
        heads = slice(2 * hk, 2 * hk + 2)
        assert bool((out[b, heads] == 0).all()) and bool((probs[b, heads] == 0).all())
    for b, hk in ((0, 1), (1, 0)):
        sums = probs[b, 2 * hk : 2 * hk + 2].sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums))
        n = int(lengths[b, hk])
        assert bool((probs[b, 2 * hk : 2 * hk + 2, n:] == 0).all())
        assert bool((probs[b, 2 * hk : 2 * hk + 2][:, ~keep[b, hk]] == 0).all())


def test_validation_errors():
    q, k, v, lengths, keep = make_case(7, 2, 16, torch.float32)
    with pytest.raises(ValueError):
        decode_attention(q[:, :3], k, v, lengths, scale=1.0)
    with pytest.raises(ValueError):
        decode_attention(q, k, v.half(), lengths, scale=1.0)
    with pytest.raises(ValueError):
        decode_attention(q, k, v, lengths, scale=1.0, keep=keep.float())
    with pytest.raises(ValueError):
        decode_attention(q, k, v, lengths, scale=1.0, keep=keep[:, :, :3])
    with pytest.raises(ValueError):
        decode_attention(q, k, v[:, :, :3], lengths, scale=1.0)
