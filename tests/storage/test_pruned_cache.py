"""Channel-pruned storage (ThinK): attention equals the zero-filled reference, bytes equal the formula."""

from __future__ import annotations

import torch

from mpckv.plaintext.attention import cache_attention
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.storage.pruned_cache import PrunedKeyCache, pruned_cache_bytes

B, HK, G, D = 2, 2, 3, 8


def dense_cache(lengths: list[list[int]], seed: int = 0) -> LayerCache:
    """A dense cache whose rows hold ``lengths[b][h]`` entries (compacted from a full prompt)."""
    g = torch.Generator().manual_seed(seed)
    t = max(max(r) for r in lengths) + 3
    lc = LayerCache(B, HK, D, torch.float32, torch.device("cpu"))
    lc.append(
        torch.randn(B, HK, t, D, generator=g),
        torch.randn(B, HK, t, D, generator=g),
        torch.arange(t).expand(B, t),
    )
    n = torch.tensor(lengths)
    index = torch.arange(t).expand(B, HK, t) + 2  # drop the first two entries, keep n of the rest
    valid = torch.arange(t) < n[..., None]
    lc.compact(index.clamp_max(t - 1), valid)
    return lc


def channels(seed: int = 1, kept: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(D, generator=g)[:kept].sort().values for _ in range(B * HK)]).view(
        B, HK, kept
    )


def zero_filled(lc: LayerCache, chan: torch.Tensor, n_old: torch.Tensor) -> torch.Tensor:
    """Naive reference: keys with the pruned channels of the first ``n_old`` entries set to zero."""
    k = lc.keys().clone()
    for b in range(B):
        for h in range(HK):
            drop = [c for c in range(D) if c not in chan[b, h].tolist()]
            for i in range(int(n_old[b, h])):
                k[b, h, i, drop] = 0.0
    return k


LENGTHS = [[9, 7], [6, 9]]
N_OLD = torch.tensor([[6, 5], [2, 6]])


def test_attention_equals_zero_filled_reference():
    lc, chan = dense_cache(LENGTHS), channels()
    ref_k, ref_v = zero_filled(lc, chan, N_OLD), lc.values().clone()
    pc = PrunedKeyCache.from_cache(lc, chan, N_OLD)
    live = pc.valid()
    torch.testing.assert_close(pc.keys() * live[..., None], ref_k * live[..., None])
    assert torch.equal(pc.positions() * live, lc.positions() * live)
    q = torch.randn(B, HK * G, D, generator=torch.Generator().manual_seed(3))
    out, probs = pc.attend(q, 0.4, None, True)
    ref_out, ref_p = cache_attention(q, ref_k, ref_v, lc.lengths, 0.4, None, True)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs, ref_p, atol=1e-6, rtol=1e-5)
    # the old part's logits are q_S · k_S (naive)
    qs = q.view(B, HK, G, D)
    s = pc.head.scores(q)
    for b in range(B):
        for h in range(HK):
            c = chan[b, h]
            for i in range(int(N_OLD[b, h])):
                want = qs[b, h][:, c] @ lc.keys()[b, h, i, c]
                torch.testing.assert_close(s[b, h, :, i], want, atol=1e-5, rtol=1e-5)


def test_append_keep_mask_and_full_width_decode_tokens():
    lc, chan = dense_cache(LENGTHS), channels()
    pc = PrunedKeyCache.from_cache(lc, chan, N_OLD)
    g = torch.Generator().manual_seed(5)
    kn, vn = torch.randn(B, HK, 1, D, generator=g), torch.randn(B, HK, 1, D, generator=g)
    pc.append(kn, vn, torch.full((B, 1), 50))
    lc.append(kn, vn, torch.full((B, 1), 50))
    ref_k = zero_filled(lc, chan, N_OLD)  # the new token keeps every channel
    q = torch.randn(B, HK * G, D, generator=g)
    keep = torch.rand(B, HK, lc.max_length, generator=g) > 0.3
    keep[..., -1] = True
    out, _ = pc.attend(q, 0.3, keep, False)
    ref, _ = cache_attention(q, ref_k, lc.values(), lc.lengths, 0.3, keep, False)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(pc.lengths, lc.lengths)


def test_compact_matches_reference():
    lc, chan = dense_cache(LENGTHS), channels()
    ref_k = zero_filled(lc, chan, N_OLD)
    pc = PrunedKeyCache.from_cache(lc, chan, N_OLD)
    pc.add_meta("score").copy_(torch.arange(pc.max_length, dtype=torch.float32).expand(B, HK, -1))
    index = torch.tensor([[[0, 3, 6, 8], [1, 2, 6, 0]], [[1, 5, 0, 0], [0, 4, 5, 8]]])
    valid = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 0]], [[1, 1, 0, 0], [1, 1, 1, 1]]]).bool()
    pc.compact(index, valid)
    kmax = int(valid.sum(-1).max())
    gather = index[..., :kmax]
    want_k = torch.gather(ref_k, 2, gather[..., None].expand(B, HK, kmax, D))
    want_pos = torch.gather(lc.positions(), 2, gather)
    live = pc.valid()
    assert torch.equal(pc.lengths, valid.sum(-1))
    torch.testing.assert_close(pc.keys() * live[..., None], want_k * live[..., None])
    assert torch.equal(pc.positions() * live, want_pos * live)
    assert torch.equal(pc.meta["score"] * live, gather.float() * live)


def test_stored_bytes_equal_formula():
    lc, chan = dense_cache(LENGTHS), channels(kept=5)
    pc = PrunedKeyCache.from_cache(lc, chan, N_OLD)
    l0, e = int(N_OLD.max()), 4
    assert pc.nbytes() == pruned_cache_bytes(B, HK, D, l0, 5, e, pc.tail)
    assert pc.nbytes() == B * HK * l0 * (5 * e + D * e + 8) + B * HK * 5 * 8 + pc.tail.nbytes()
    n_new = lc.lengths - N_OLD
    assert pc.live_bytes() == int(N_OLD.sum()) * (5 + D) * e + int(n_new.sum()) * 2 * D * e
    assert pc.live_bytes() < lc.live_bytes()
    assert pc.head.kp.shape == (B, HK, l0, 5)  # really stored with 5 of 8 channels
