"""Ragged storage (AdaKV): attention equals the padded reference, bytes equal the formula (no padding)."""

from __future__ import annotations

import torch

from mpckv.plaintext.attention import cache_attention
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.storage.ragged_cache import RaggedCache, ragged_cache_bytes

B, HK, G, D, T = 2, 3, 2, 8, 14


def selection(seed: int = 0):
    """A dense cache and a per-row selection of different lengths (one row empty-ish)."""
    g = torch.Generator().manual_seed(seed)
    lc = LayerCache(B, HK, D, torch.float32, torch.device("cpu"))
    lc.append(
        torch.randn(B, HK, T, D, generator=g),
        torch.randn(B, HK, T, D, generator=g),
        torch.arange(T).expand(B, T),
    )
    counts = torch.tensor([[3, 11, 1], [7, 2, 14]])
    index = torch.stack([torch.randperm(T, generator=g).view(1, T) for _ in range(B * HK)]).view(B, HK, T)
    index = torch.where(torch.arange(T) < counts[..., None], index, T).sort(-1).values.clamp_max(T - 1)
    valid = torch.arange(T) < counts[..., None]
    return lc, index, valid


def test_attention_equals_padded_reference_with_decode_tokens():
    lc, index, valid = selection()
    rc = RaggedCache.from_selection(lc, index, valid)
    lc.compact(index, valid)  # the padded reference
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        q = torch.randn(B, HK * G, D, generator=g)
        out, probs = rc.attend(q, 0.35, None, True)
        ref, ref_p = cache_attention(q, lc.keys(), lc.values(), lc.lengths, 0.35, None, True)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probs, ref_p, atol=1e-6, rtol=1e-5)
        kn, vn = torch.randn(B, HK, 1, D, generator=g), torch.randn(B, HK, 1, D, generator=g)
        rc.append(kn, vn, torch.full((B, 1), T + step))
        lc.append(kn, vn, torch.full((B, 1), T + step))
    live = lc.valid()
    assert torch.equal(rc.lengths, lc.lengths)
    assert torch.equal(rc.positions() * live, lc.positions() * live)
    torch.testing.assert_close(rc.keys() * live[..., None], lc.keys() * live[..., None])


def test_compact_matches_dense_compact():
    lc, index, valid = selection(1)
    rc = RaggedCache.from_selection(lc, index, valid)
    lc.compact(index, valid)
    rc.append(torch.ones(B, HK, 1, D), torch.ones(B, HK, 1, D), torch.full((B, 1), 99))
    lc.append(torch.ones(B, HK, 1, D), torch.ones(B, HK, 1, D), torch.full((B, 1), 99))
    n = lc.lengths
    keep_n = (n + 1) // 2
    idx = (n - keep_n)[..., None] + torch.arange(int(keep_n.max()))  # keep the newest half of every row
    ok = torch.arange(int(keep_n.max())) < keep_n[..., None]
    idx = torch.where(ok, idx, 0)
    rc.compact(idx, ok)
    lc.compact(idx, ok)
    live = lc.valid()
    assert torch.equal(rc.lengths, lc.lengths)
    assert torch.equal(rc.positions() * live, lc.positions() * live)
    torch.testing.assert_close(rc.values() * live[..., None], lc.values() * live[..., None])


def test_stored_bytes_equal_formula_without_padding():
    lc, index, valid = selection(2)
    rc = RaggedCache.from_selection(lc, index, valid)
    counts = valid.sum(-1)
    n = int(counts.sum())
    assert rc.nbytes() == ragged_cache_bytes(counts, D, 4, rc.tail)
    assert rc.nbytes() == n * (2 * D * 4 + 8) + 16 * B * HK  # empty tail
    lc.compact(index, valid)
    padded = B * HK * int(counts.max()) * (2 * D * 4 + 8)
    assert lc.nbytes() == padded > rc.nbytes()
    assert rc.live_bytes() == lc.live_bytes() == n * 2 * D * 4
    rc.append(torch.ones(B, HK, 1, D), torch.ones(B, HK, 1, D), torch.full((B, 1), 99))
    assert rc.nbytes() == ragged_cache_bytes(counts, D, 4, rc.tail)


def test_row_loop_and_segment_paths_agree():
    lc, index, valid = selection(3)
    rc = RaggedCache.from_selection(lc, index, valid)
    rc.append(torch.ones(B, HK, 1, D), torch.ones(B, HK, 1, D), torch.full((B, 1), 99))
    q = torch.randn(B, HK * G, D, generator=torch.Generator().manual_seed(8))
    everything = torch.ones(B, HK, rc.max_length, dtype=torch.bool)  # a keep mask routes to segment ops
    a, pa = rc.attend(q, 0.5, None, True)
    b, pb = rc.attend(q, 0.5, everything, True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
