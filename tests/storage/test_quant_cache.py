"""QuantizedLayerCache: logical layout, demotion, byte accounting and attention vs naive references."""

from __future__ import annotations

import pytest
import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.kernels.decode_attention import decode_attention
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.storage import quant
from mpckv.plaintext.storage.base import AttendingCache, FormatCache
from mpckv.plaintext.storage.channel_codecs import FFTSignKeys, TernaryValues
from mpckv.plaintext.storage.quantized_cache import QuantizedLayerCache, TokenRTN

B, HK, D, N = 2, 2, 16, 20


def _filled(
    seed: int = 0, lengths: tuple[int, int] = (N, N - 6)
) -> tuple[LayerCache, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lc = LayerCache(B, HK, D, torch.float32, torch.device("cpu"))
    k, v = torch.randn(B, HK, N, D, generator=g), torch.randn(B, HK, N, D, generator=g)
    lc.append(k, v, torch.arange(N).expand(B, N), counts=torch.tensor(lengths))
    return lc, k, v


def _token_codecs(bits: int = 4, group: int = D, balance: bool = False) -> tuple[TokenRTN, TokenRTN]:
    bal = torch.rand(B, HK, D, generator=torch.Generator().manual_seed(9)) + 0.5 if balance else None
    return TokenRTN(bits, group, D, balance=bal), TokenRTN(bits, group, D)


def _demote_first(qc: QuantizedLayerCache, n: torch.Tensor) -> None:
    kmax = int(n.max())
    idx = torch.arange(kmax).expand(B, HK, kmax)
    qc.demote(idx, idx < n[..., None])


def test_is_a_format_cache():
    qc = QuantizedLayerCache(_filled()[0], *_token_codecs())
    assert isinstance(qc, FormatCache) and isinstance(qc, AttendingCache)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_demotion_keeps_the_logical_layout(bits):
    """keys()/values()/positions() after demotion = [kept full precision | quantized] with the quantized
    part equal to the codec's own round trip of those entries (naive per-row reference)."""
    lc, k, v = _filled(1)
    kc, vc = _token_codecs(bits, 8, balance=True)
    qc = QuantizedLayerCache(lc, kc, vc)
    n = torch.tensor([[5, 3], [0, 6]])
    _demote_first(qc, n)
    lengths = torch.tensor([N, N - 6])
    assert torch.equal(qc.lengths, lengths[:, None].expand(B, HK))
    keys, vals, pos = qc.keys(), qc.values(), qc.positions()
    for b in range(B):
        for h in range(HK):
            m, total = int(n[b, h]), int(lengths[b])
            exp_pos = list(range(m, total)) + list(range(m))
            assert pos[b, h, :total].tolist() == exp_pos
            torch.testing.assert_close(keys[b, h, : total - m], k[b, h, m:total])  # full precision: exact
            ref_k = kc.decode(kc.encode(k[:, :, :m]))[b, h] if m else k[b, h, :0]
            ref_v = vc.decode(vc.encode(v[:, :, :m]))[b, h] if m else v[b, h, :0]
            torch.testing.assert_close(keys[b, h, total - m : total], ref_k)
            torch.testing.assert_close(vals[b, h, total - m : total], ref_v)
            assert qc.is_low()[b, h, :total].tolist() == [False] * (total - m) + [True] * m


def test_nbytes_is_the_format_formula():
    """Stored bytes = full-precision store + capacity × (packed K/V codes + fp16 scales/zeros + int64
    position) + the fp32 balancer; live bytes = the live payload."""
    lc, _, _ = _filled(2)
    kc, vc = _token_codecs(4, 8, balance=True)
    qc = QuantizedLayerCache(lc, kc, vc)
    _demote_first(qc, torch.tensor([[7, 7], [4, 4]]))
    cap = qc.lo.capacity
    per_token = 2 * (quant.packed_size(D, 4) + 2 * (D // 8) * 2) + 8  # codes + (scale, zero) fp16 + pos
    assert qc.nbytes() == qc.hi.nbytes() + B * HK * cap * per_token + B * HK * D * 4
    hi_live = int(qc.hi.lengths.sum()) * 2 * D * 4
    assert qc.live_bytes() == hi_live + (7 + 7 + 4 + 4) * 2 * (quant.packed_size(D, 4) + 2 * (D // 8) * 2)
    tensors = [
        qc.hi.k,
        qc.hi.v,
        qc.hi.pos,
        *qc.hi.meta.values(),
        *qc.lo.k.values(),
        *qc.lo.v.values(),
        qc.lo.pos,
    ]
    assert qc.nbytes() == sum(t.numel() * t.element_size() for t in tensors) + kc.balance.numel() * 4  # type: ignore[union-attr]


def test_vidkv_codec_bytes_formula():
    g = 4
    lc, _, _ = _filled(3, (N, N))
    perm = torch.arange(D).expand(B, HK, D).contiguous()
    kc, vc = FFTSignKeys(g, perm, 8), TernaryValues(g, D)
    qc = QuantizedLayerCache(lc, kc, vc)
    _demote_first(qc, torch.tensor([[8, 8], [8, 8]]))
    e = D - 8
    per_group = g * quant.packed_size(8, 2) + 2 * 8 * 2 + g * quant.packed_size(e, 1) + e * 2  # keys
    per_group += g * quant.packed_size(D, quant.TERNARY) + D * 2  # values
    assert qc.lo.live_bytes() == 2 * B * HK * per_group
    assert qc.nbytes() == qc.hi.nbytes() + B * HK * qc.lo.capacity * (per_group + g * 8) + perm.numel() * 8


@pytest.mark.parametrize("codec", ["rtn4", "rtn2_g4", "rtn3", "vidkv", "vidkv_2bit"])
def test_attend_equals_attention_over_the_dequantized_cache(codec):
    lc, _, _ = _filled(4)
    if codec.startswith("rtn"):
        bits = int(codec[3])
        kc, vc = _token_codecs(bits, 4 if "g4" in codec else D, balance=True)
        n = torch.tensor([[5, 3], [0, 6]])
    else:
        perm = torch.randperm(D, generator=torch.Generator().manual_seed(1)).expand(B, HK, D).contiguous()
        kc, vc = FFTSignKeys(4, perm, 5), TernaryValues(4, D, 2 if codec.endswith("2bit") else quant.TERNARY)  # type: ignore[assignment]
        n = torch.tensor([[8, 4], [0, 12]])
    qc = QuantizedLayerCache(lc, kc, vc)
    _demote_first(qc, n)
    q = torch.randn(B, 4, D, generator=torch.Generator().manual_seed(5))
    keep = torch.rand(B, HK, qc.max_length, generator=torch.Generator().manual_seed(6)) > 0.2
    for kp in (None, keep):
        ref, ref_p = decode_attention(
            q, qc.keys(), qc.values(), qc.lengths, scale=0.3, keep=kp, return_probs=True
        )
        out, probs = qc.attend(q, 0.3, kp, True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert probs is not None
        torch.testing.assert_close(probs, ref_p, atol=1e-6, rtol=1e-4)
        out2, none = qc.attend(q, 0.3, kp, False)
        assert none is None
        torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)
    # a selection reads the named rows of the logical layout
    idx = torch.tensor([[0, 2, 15], [1, 3, 4]])[None].expand(B, HK, 3).contiguous()
    counts = torch.tensor([[3, 2], [3, 3]])
    ks = torch.gather(qc.keys(), 2, idx[..., None].expand(B, HK, 3, D))
    vs = torch.gather(qc.values(), 2, idx[..., None].expand(B, HK, 3, D))
    ref, _ = decode_attention(q, ks, vs, counts, scale=0.3)
    torch.testing.assert_close(qc.attend(q, 0.3, None, False, index=idx, counts=counts)[0], ref)


def test_empty_low_store_is_bit_exact_dense():
    lc, k, v = _filled(7)
    qc = QuantizedLayerCache(lc, *_token_codecs())
    q = torch.randn(B, 4, D)
    ref, ref_p = decode_attention(q, lc.keys(), lc.values(), lc.lengths, scale=0.25, return_probs=True)
    out, probs = qc.attend(q, 0.25, None, True)
    assert torch.equal(out, ref) and probs is not None and torch.equal(probs, ref_p)


def test_drop_mode_evicts():
    lc, k, _ = _filled(8)
    qc = QuantizedLayerCache(lc, *_token_codecs(), drop=True)
    _demote_first(qc, torch.tensor([[4, 4], [2, 2]]))
    assert qc.lo.nbytes() == 0 and qc.lengths.tolist() == [[N - 4, N - 4], [N - 8, N - 8]]
    torch.testing.assert_close(qc.keys()[0, 0, : N - 4], k[0, 0, 4:])


def test_compact_over_both_stores_and_appends():
    lc, _, _ = _filled(9, (N, N))
    qc = QuantizedLayerCache(lc, *_token_codecs(8))
    _demote_first(qc, torch.tensor([[6, 6], [6, 6]]))
    before_k, before_p = qc.keys(), qc.positions()
    idx = torch.tensor([0, 3, 14, 15, 19])[None, None].expand(B, HK, 5).contiguous()  # hi: 0..13, lo: 14..19
    qc.compact(idx)
    assert qc.hi.lengths.tolist() == [[2, 2], [2, 2]] and qc.lo.units.tolist() == [[3, 3], [3, 3]]
    torch.testing.assert_close(qc.keys(), torch.gather(before_k, 2, idx[..., None].expand(B, HK, 5, D)))
    assert torch.equal(qc.positions(), torch.gather(before_p, 2, idx))
    qc.append(torch.ones(B, HK, 1, D), torch.ones(B, HK, 1, D), torch.full((B, 1), 99))
    assert qc.positions()[:, :, 2].eq(99).all() and qc.lengths.eq(6).all()


def test_demote_checks():
    lc, _, _ = _filled(10)
    perm = torch.arange(D).expand(B, HK, D).contiguous()
    qc = QuantizedLayerCache(lc, FFTSignKeys(4, perm, 8), TernaryValues(4, D))
    with pytest.raises(ShapeError, match="multiple"):
        _demote_first(qc, torch.tensor([[3, 4], [4, 4]]))
    with pytest.raises(ConfigError):
        TokenRTN(4, 5, D)
    with pytest.raises(ConfigError):
        QuantizedLayerCache(lc, FFTSignKeys(4, perm, 8), TokenRTN(4, D, D))


@pytest.mark.parametrize("drop", [False, True])
def test_demote_one_equals_demote(drop):
    """The in-place one-entry demotion leaves the same logical cache (keys, values, positions, metadata,
    both stores) as the general demote of the same slots, and keeps the full-precision capacity."""
    slot = torch.tensor([[0, 7], [N - 4, 12]])  # N − 3 full-precision entries left
    caches = []
    for _ in range(2):
        lc, _, _ = _filled(11, (N, N))
        lc.add_meta("score")[:, :, :N] = torch.arange(N, dtype=torch.float32)
        caches.append(QuantizedLayerCache(lc, *_token_codecs(4, 8, balance=True), drop=drop))
    ref, fast = caches
    _demote_first(ref, torch.tensor([[3, 3], [3, 3]]))
    _demote_first(fast, torch.tensor([[3, 3], [3, 3]]))
    cap = fast.hi.capacity
    ref.demote(slot[..., None], torch.ones(B, HK, 1, dtype=torch.bool))
    fast.demote_one(slot)
    assert fast.hi.capacity == cap and torch.equal(fast.lengths, ref.lengths)
    assert torch.equal(fast.keys(), ref.keys()) and torch.equal(fast.values(), ref.values())
    assert torch.equal(fast.positions(), ref.positions())
    n = ref.hi.max_length
    assert torch.equal(fast.meta["score"][:, :, :n], ref.meta["score"][:, :, :n])
    with pytest.raises(ShapeError):
        fast.demote_one(slot[:1])
