"""ThinK oracles (card: shared/methods/think.md)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import mpckv
from mpckv.plaintext.methods.think import ThinK
from mpckv.plaintext.storage.pruned_cache import PrunedKeyCache
from mpckv.registry import get_method

from .test_snapkv import make_ctx


def with_kv(made):
    ctx = made[0]
    ctx.kv = SimpleNamespace(layers=[ctx.cache] * ctx.config.num_hidden_layers)
    return ctx


def naive_channels(q, keys, lengths, prompt_lengths, window, kept):
    """Loop reference: per KV head, score_c = mean_{g,t} q² · mean_j k² and the top ``kept`` channels."""
    b, h, _, d = q.shape
    hk = keys.shape[1]
    g = h // hk
    out = torch.zeros(b, hk, kept, dtype=torch.long)
    for bi in range(b):
        n = int(prompt_lengths[bi])
        w = min(window, q.shape[2])
        rows = [max(n - w + i, 0) for i in range(w)]
        for hi in range(hk):
            scores = []
            for c in range(d):
                qs = [float(q[bi, hi * g + gi, t, c]) ** 2 for gi in range(g) for t in rows]
                ks = [float(keys[bi, hi, j, c]) ** 2 for j in range(int(lengths[bi, hi]))]
                scores.append(sum(qs) / len(qs) * sum(ks) / max(len(ks), 1))
            order = sorted(range(d), key=lambda c: (-scores[c], c))[:kept]
            out[bi, hi] = torch.tensor(sorted(order))
    return out


def test_kept_channels_equal_naive_reference():
    for lengths in ([20, 13], [9, 17]):
        ctx = with_kv(make_ctx(lengths, d=8))
        m = ThinK(ratio=0.4, obs_window=4, budget=3)
        want = naive_channels(ctx.q, ctx.cache.keys(), ctx.cache.lengths, ctx.prompt_lengths, 4, 5)
        assert torch.equal(m.channels(ctx), want)
        m.on_prefill(ctx)
        pc = ctx.cache
        assert isinstance(pc, PrunedKeyCache)
        assert torch.equal(pc.head.chan, want)
        assert pc.head.kept_channels == 8 - int(0.4 * 8)
        # exactly the last `budget` entries of every row and nothing else keep full keys
        assert torch.equal(pc.tail.lengths, torch.full_like(pc.tail.lengths, 3))
        assert torch.equal(pc.head.lengths, torch.tensor(lengths)[:, None].expand(-1, 2) - 3)


def test_channel_choice_invariant_to_consistent_permutation():
    ctx = with_kv(make_ctx([16, 11], d=8, seed=4))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(9))
    ctx2 = with_kv(make_ctx([16, 11], d=8, seed=4))
    ctx2.q = ctx2.q[..., perm]
    ctx2.cache.k = ctx2.cache.k[..., perm]
    m = ThinK(ratio=0.5, obs_window=8)
    a, b = perm[m.channels(ctx2)].sort(-1).values, m.channels(ctx)
    assert torch.equal(a, b)


def test_ratio_zero_is_dense_bit_exact(tiny_random_model):
    p = list(range(5, 45))
    dense, eng = (
        mpckv.Engine(tiny_random_model),
        mpckv.Engine(tiny_random_model, "think", ratio=0.0, budget=4),
    )
    ds, ms = dense.prefill([p]), eng.prefill([p])
    assert all(type(lc).__name__ == "LayerCache" for lc in ms.cache.layers)
    for _ in range(3):
        tok = ds.logits.argmax(-1)
        assert torch.equal(eng.decode(ms, tok), dense.decode(ds, tok))


def test_snapkv_then_think_prunes_what_snapkv_kept(tiny_random_model):
    p = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    snap = mpckv.Engine(tiny_random_model, "snapkv", budget=0.5, window=4).prefill([p])
    both_m = get_method("snapkv+think", budget=0.5, window=4)
    both = mpckv.Engine(tiny_random_model, both_m).prefill([p])
    for a, b in zip(snap.cache.layers, both.cache.layers, strict=True):
        assert isinstance(b, PrunedKeyCache)
        assert torch.equal(a.positions(), b.positions())
        assert b.live_bytes() < a.live_bytes()
        assert torch.equal(b.tail.lengths, (a.lengths * 0.5).long())  # newest half of SnapKV's entries


def test_decode_runs_and_shrinks_bytes(tiny_random_model):
    p = list(range(3, 51))
    res = mpckv.Engine(tiny_random_model, "think", budget=8).generate([p, p[:30]], 4, stop_tokens=[])
    dense = mpckv.Engine(tiny_random_model).generate([p, p[:30]], 4, stop_tokens=[])
    assert res.stats.live_cache_bytes < dense.stats.live_cache_bytes
    assert res.stats.kept_per_layer == dense.stats.kept_per_layer


def test_recent_overrides_the_shared_budget(tiny_random_model):
    p = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    s = mpckv.Engine(tiny_random_model, get_method("snapkv+think", budget=0.5, window=4, recent=3)).prefill(
        [p]
    )
    for lc in s.cache.layers:
        assert torch.equal(lc.tail.lengths, torch.full_like(lc.tail.lengths, 3))
        assert torch.equal(lc.lengths, torch.full_like(lc.lengths, 24))
