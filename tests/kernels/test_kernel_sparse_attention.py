"""Sparse decode attention over index lists: torch path and Triton kernel (interpreter) against an oracle."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import mpckv.kernels.sparse_attention as sa
from mpckv.kernels._common import is_interpreted
from mpckv.kernels.decode_attention import decode_attention
from mpckv.kernels.sparse_attention import sparse_decode_attention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _need_triton() -> None:
    pytest.importorskip("triton")
    if not sa.HAS_TRITON or not is_interpreted(sa._sparse_partial_kernel):
        pytest.skip("mpckv.kernels was imported before TRITON_INTERPRET=1 was set")


def make_case(L, K, G, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, Hk = 2, 2
    k = torch.randn(B, Hk, L, d, generator=gen) * 1.5
    v = torch.randn(B, Hk, L, d, generator=gen)
    q = torch.randn(B, Hk * G, d, generator=gen)
    counts = torch.tensor([[K, max(K // 2, 1)], [max(K - 3, 1), 0]])
    index = torch.zeros(B, Hk, K, dtype=torch.long)
    used = torch.zeros(B, Hk, L, dtype=torch.bool)
    for b in range(B):
        for h in range(Hk):
            c = int(counts[b, h])
            rows = torch.randperm(L, generator=gen)[:c].sort().values
            index[b, h, :c] = rows
            used[b, h, rows] = True
    # rows never selected hold NaN: they must never be read
    k = torch.where(used[..., None], k, float("nan"))
    v = torch.where(used[..., None], v, float("nan"))
    keep = torch.rand(B, Hk, K, generator=gen) > 0.2
    return q.to(dtype), k.to(dtype), v.to(dtype), index, counts, keep


def oracle(q, k, v, index, counts, scale, keep):
    """Explicit loop over (b, h) in float64 over the listed rows."""
    B, H, _ = q.shape
    Hk = k.shape[1]
    G = H // Hk
    out = torch.zeros(B, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // G
            cols = [c for c in range(int(counts[b, hk])) if keep is None or bool(keep[b, hk, c])]
            if not cols:
                continue
            rows = index[b, hk, cols]
            p = torch.softmax(k[b, hk, rows].double() @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v[b, hk, rows].double()
    return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("L", "K", "G"), [(9, 4, 1), (70, 40, 2), (130, 67, 4)])
@pytest.mark.parametrize("with_keep", [False, True])
def test_matches_oracle(impl, dtype, L, K, G, with_keep):
    if impl == "triton":
        _need_triton()
    q, k, v, index, counts, keep = make_case(L, K, G, 16, dtype)
    keep = keep if with_keep else None
    out, probs = sparse_decode_attention(q, k, v, index, counts, scale=0.3, keep=keep, impl=impl)
    assert probs is None and out.dtype == dtype
    torch.testing.assert_close(
        out.double(), oracle(q, k, v, index, counts, 0.3, keep), atol=TOL[dtype], rtol=TOL[dtype]
    )
    assert out[1, G : 2 * G].abs().max() == 0  # a row with count 0 gives zeros


def test_torch_path_equals_gather_then_dense_with_probs():
    q, k, v, index, counts, keep = make_case(50, 20, 2, 8, torch.float32, seed=3)
    out, probs = sparse_decode_attention(q, k, v, index, counts, scale=0.5, return_probs=True, impl="torch")
    b, hk, kk = index.shape
    ks = torch.gather(k, 2, index[..., None].expand(b, hk, kk, 8))
    vs = torch.gather(v, 2, index[..., None].expand(b, hk, kk, 8))
    ref, ref_p = decode_attention(q, ks, vs, counts, scale=0.5, return_probs=True, impl="torch")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs, ref_p)


def test_triton_splits_merge():
    _need_triton()
    q, k, v, index, counts, _ = make_case(300, 200, 2, 16, torch.float32, seed=5)
    out, _ = sa._sparse_triton(q, k, v, index, counts, 0.25, None, False, num_splits=3, block_k=16)
    torch.testing.assert_close(out.double(), oracle(q, k, v, index, counts, 0.25, None), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    q, k, v, index, counts, keep = make_case(9, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError):
        sparse_decode_attention(q, k, v, index.float(), counts, scale=1.0)
    with pytest.raises(ValueError):
        sparse_decode_attention(q, k, v, index, counts, scale=1.0, keep=keep[..., :2])
    with pytest.raises(ValueError):
        sparse_decode_attention(q, k, v, index, counts[:1], scale=1.0)


@pytest.mark.parametrize("layout", ["contiguous", "prefix", "transposed", "batch2"])
def test_gather_rows_equals_torch_gather(layout):
    gen = torch.Generator().manual_seed(0)
    b = 2 if layout == "batch2" else 1
    full = torch.randn(b, 3, 20, 8, generator=gen)
    x = {"contiguous": full, "prefix": full[:, :, :13], "batch2": full[:, :, :13]}.get(layout)
    if layout == "transposed":
        x = torch.randn(b, 20, 3, 8, generator=gen).transpose(1, 2)  # rows not laid out head after head
    index = torch.randint(0, x.shape[2], (b, 3, 7), generator=gen)
    ref = torch.gather(x, 2, index[..., None].expand(b, 3, 7, 8))
    assert torch.equal(sa.gather_rows(x, index), ref)
