"""AdaKV oracles: α = 1 is SnapKV, the layer total equals the budget, allocation = a naive reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from mpckv.plaintext.methods.adakv import AdaKV
from mpckv.plaintext.methods.snapkv import SnapKV
from mpckv.plaintext.storage.ragged_cache import RaggedCache

from .test_snapkv import make_ctx


def ctx_for(lengths, seed=0, kv_heads=2):
    ctx = make_ctx(lengths, seed=seed, heads=2 * kv_heads, kv_heads=kv_heads)[0]
    ctx.kv = SimpleNamespace(layers=[ctx.cache] * ctx.config.num_hidden_layers)
    return ctx


def naive_allocation(scores, n, cap, window, alpha):
    """Per sample: each head keeps its window and top ⌊α(C − w)⌋ prefix; the rest of Hk·C by a global sort."""
    hk = scores.shape[0]
    w = min(window, cap)
    kept = [set(range(n - w, n)) for _ in range(hk)]
    safe = math.floor(alpha * (cap - w) + 1e-6)
    for h in range(hk):
        order = sorted(range(n - w), key=lambda j: (-float(scores[h, j]), j))
        kept[h] |= set(order[:safe])
    rest = hk * cap - sum(len(s) for s in kept)
    pool = [(h, j) for h in range(hk) for j in range(n - w) if j not in kept[h]]
    pool.sort(key=lambda x: (-float(scores[x[0], x[1]]), x[0], x[1]))
    for h, j in pool[:rest]:
        kept[h].add(j)
    return kept


def test_allocation_equals_naive_reference_and_total_is_layer_budget():
    for seed, lengths, alpha in ((0, [40, 33], 0.2), (1, [25, 40], 0.0), (2, [40, 40], 0.5)):
        ctx = ctx_for(lengths, seed, kv_heads=3)
        m = AdaKV(window=4, kernel_size=3, alpha=alpha, budget=12)
        scores = m.scores(ctx)
        m.on_prefill(ctx)
        rc = ctx.cache
        assert isinstance(rc, RaggedCache)
        for b, n in enumerate(lengths):
            want = naive_allocation(scores[b], n, 12, 4, alpha)
            for h in range(3):
                got = rc.positions()[b, h, : int(rc.lengths[b, h])].tolist()
                assert got == sorted(want[h]), (seed, b, h)
            assert int(rc.lengths[b].sum()) == 3 * 12  # the layer budget, spread unevenly


def test_alpha_one_equals_snapkv():
    for lengths in ([30, 21], [18, 30]):
        a, b = ctx_for(lengths), ctx_for(lengths)
        AdaKV(window=4, alpha=1.0, budget=0.4).on_prefill(a)
        SnapKV(window=4, budget=0.4).on_prefill(b)
        live = b.cache.valid()
        assert torch.equal(a.cache.lengths, b.cache.lengths)
        assert torch.equal(a.cache.positions() * live, b.cache.positions() * live)
        assert torch.equal(a.cache.keys() * live[..., None], b.cache.keys() * live[..., None])


def test_uneven_heads_save_real_memory():
    ctx = ctx_for([40, 40], 3, kv_heads=3)
    AdaKV(window=2, alpha=0.0, kernel_size=1, scorer="votes", budget=10).on_prefill(ctx)
    rc = ctx.cache
    n = rc.lengths
    assert int(n.max()) > int(n.min())  # budgets differ per head
    padded = 2 * 3 * int(n.max()) * (2 * 8 * 4 + 8)  # what the padded LayerCache would allocate
    assert rc.nbytes() == int(n.sum()) * (2 * 8 * 4 + 8) + 16 * 6 < padded


def test_other_scorers_run():
    for scorer in ("attention", "keynorm"):
        ctx = ctx_for([30, 22])
        AdaKV(window=4, scorer=scorer, budget=8).on_prefill(ctx)
        assert int(ctx.cache.lengths.sum()) == 4 * 8
