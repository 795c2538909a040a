"""Two-segment quantized decode attention: torch (scale folded) and Triton paths vs a naive reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mpckv.kernels.decode_attention import decode_attention  # noqa: E402
from mpckv.kernels.quant_attention import (  # noqa: E402
    HAS_TRITON,
    QuantSegment,
    dequantize_segment,
    quant_attention,
)
from mpckv.plaintext.storage.quant import pack, quantize_rtn  # noqa: E402

IMPLS = ["torch", "triton"] if HAS_TRITON else ["torch"]
B, H, HK, D = 2, 4, 2, 16


def _seg(x, bits, group, sym=False, bal=None):
    xx = x if bal is None else x * bal[:, :, None, :]
    r = quantize_rtn(xx, bits, group, symmetric=sym)
    return QuantSegment(pack(r.codes, bits), r.scale, r.zero, bits, group, x.shape[-1], bal)


def _reference(q, kh, vh, lh, kd, vd, ll, scale, keep_h=None, keep_l=None):
    """Per row: concatenate the live (kept) entries of both segments, explicit softmax."""
    g = q.shape[1] // kh.shape[1]
    out = torch.zeros(q.shape)
    p_h = torch.zeros(q.shape[0], q.shape[1], kh.shape[2])
    p_l = torch.zeros(q.shape[0], q.shape[1], kd.shape[2])
    for b in range(q.shape[0]):
        for h in range(kh.shape[1]):
            ih = [i for i in range(int(lh[b, h])) if keep_h is None or keep_h[b, h, i]]
            il = [i for i in range(int(ll[b, h])) if keep_l is None or keep_l[b, h, i]]
            if not ih and not il:
                continue
            k = torch.cat([kh[b, h, ih], kd[b, h, il]])
            v = torch.cat([vh[b, h, ih], vd[b, h, il]])
            qq = q[b, h * g : (h + 1) * g]
            p = torch.softmax(qq @ k.T * scale, -1)
            out[b, h * g : (h + 1) * g] = p @ v
            p_h[b, h * g : (h + 1) * g][:, ih] = p[:, : len(ih)]
            p_l[b, h * g : (h + 1) * g][:, il] = p[:, len(ih) :]
    return out, p_h, p_l


CASES = [
    (4, 16, False, True),
    (4, 8, False, False),
    (2, 4, False, True),
    (8, 16, True, False),
    (1, 16, False, False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("bits", "group", "sym", "balance"), CASES)
def test_matches_reference(impl, bits, group, sym, balance):
    g = torch.Generator().manual_seed(bits * 7 + group)
    lh_max, ll_max = 5, 37
    q = torch.randn(B, H, D, generator=g)
    kh, vh = torch.randn(B, HK, lh_max, D, generator=g), torch.randn(B, HK, lh_max, D, generator=g)
    kl, vl = torch.randn(B, HK, ll_max, D, generator=g), torch.randn(B, HK, ll_max, D, generator=g)
    kh[0, 1, 4:] = float("nan")  # garbage past a row's length never leaks
    bal = torch.rand(B, HK, D, generator=g) + 0.5 if balance else None
    sk, sv = _seg(kl, bits, group, sym, bal), _seg(vl, bits, group, sym)
    lh = torch.tensor([[5, 3], [4, 5]])
    ll = torch.tensor([[37, 30], [20, 0]])
    kd, vd = dequantize_segment(sk), dequantize_segment(sv)
    ref, rp_h, rp_l = _reference(q, kh, vh, lh, kd, vd, ll, 0.3)
    out, p_h, p_l = quant_attention(q, kh, vh, lh, sk, sv, ll, scale=0.3, return_probs=True, impl=impl)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(p_h, rp_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p_l, rp_l, atol=1e-6, rtol=1e-5)
    out2, n1, n2 = quant_attention(q, kh, vh, lh, sk, sv, ll, scale=0.3, impl=impl)
    assert n1 is None and n2 is None
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_keep_masks_and_empty_rows(impl):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, D, generator=g)
    kh, vh = torch.randn(B, HK, 4, D, generator=g), torch.randn(B, HK, 4, D, generator=g)
    kl, vl = torch.randn(B, HK, 20, D, generator=g), torch.randn(B, HK, 20, D, generator=g)
    sk, sv = _seg(kl, 4, 16), _seg(vl, 4, 16)
    lh, ll = torch.tensor([[4, 0], [2, 4]]), torch.tensor([[20, 0], [7, 20]])  # row (0, 1) sees nothing
    keep_h = torch.rand(B, HK, 4, generator=g) > 0.3
    keep_l = torch.rand(B, HK, 20, generator=g) > 0.5
    ref, rp_h, rp_l = _reference(
        q, kh, vh, lh, dequantize_segment(sk), dequantize_segment(sv), ll, 0.25, keep_h, keep_l
    )
    out, p_h, p_l = quant_attention(
        q, kh, vh, lh, sk, sv, ll, scale=0.25, keep_hi=keep_h, keep_lo=keep_l, return_probs=True, impl=impl
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(p_l, rp_l, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(out[0, 2:]) == 0


def test_eight_bit_segment_is_close_to_dense_attention():
    """Sanity of the whole path: 8-bit codes give almost the dense output."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, H, D, generator=g)
    k, v = torch.randn(1, HK, 40, D, generator=g), torch.randn(1, HK, 40, D, generator=g)
    dense, _ = decode_attention(q, k, v, torch.full((1, HK), 40), scale=0.25)
    sk, sv = _seg(k[:, :, 8:], 8, 16), _seg(v[:, :, 8:], 8, 16)
    out, _, _ = quant_attention(
        q, k[:, :, :8], v[:, :, :8], torch.full((1, HK), 8), sk, sv, torch.full((1, HK), 32), scale=0.25
    )
    torch.testing.assert_close(out, dense, atol=2e-2, rtol=0)


def test_bad_inputs():
    q = torch.randn(1, H, D)
    k = torch.randn(1, HK, 2, D)
    seg = _seg(torch.randn(1, HK, 3, D), 4, 16)
    bad = QuantSegment(seg.codes, seg.scale, seg.zero, 3, 16, D)
    with pytest.raises(ValueError, match="planar"):
        quant_attention(q, k, k, torch.full((1, HK), 2), bad, seg, torch.full((1, HK), 3), scale=1.0)
    with pytest.raises(ValueError, match="balancer"):
        bal = QuantSegment(seg.codes, seg.scale, seg.zero, 4, 16, D, torch.ones(1, HK, D))
        quant_attention(q, k, k, torch.full((1, HK), 2), seg, bal, torch.full((1, HK), 3), scale=1.0)
