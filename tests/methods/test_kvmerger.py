"""KVMerger oracles (card: shared/methods/kvmerger.md)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mpckv.plaintext.methods.kvmerger import KVMerger
from mpckv.plaintext.methods.scorers import window_votes
from mpckv.plaintext.methods.snapkv import SnapKV
from mpckv.plaintext.storage.merge import adjacent_cosine, merge_runs, merge_set_ids
from mpckv.plaintext.storage.ragged_cache import RaggedCache, ragged_cache_bytes

from .test_snapkv import make_ctx


def similar_ctx(lengths, seed=0):
    """A prefill context whose keys come in runs of near-duplicates."""
    ctx, q, k = make_ctx(lengths, seed=seed)
    g = torch.Generator().manual_seed(seed + 11)
    hold = torch.rand(k.shape[:3], generator=g) < 0.5
    for j in range(1, k.shape[2]):
        ctx.cache.k[:, :, j] = torch.where(
            hold[:, :, j, None],
            ctx.cache.k[:, :, j - 1] + 0.02 * torch.randn(k.shape[0], k.shape[1], k.shape[3], generator=g),
            ctx.cache.k[:, :, j],
        )
    return ctx


def test_threshold_above_one_is_window_vote_eviction():
    """No pair qualifies ⇒ KVMerger is SnapKV without pooling (votes summed over the group)."""
    for lengths in ([30, 21], [18, 30]):
        a, b = similar_ctx(lengths), similar_ctx(lengths)
        KVMerger(threshold=1.5, window=4, budget=10, ragged=False).on_prefill(a)
        SnapKV(window=4, kernel_size=1, group_reduce="sum", budget=10).on_prefill(b)
        assert torch.equal(a.cache.lengths, b.cache.lengths)
        assert torch.equal(a.cache.positions(), b.cache.positions())
        assert torch.equal(a.cache.keys(), b.cache.keys())


def test_full_budget_untouched():
    ctx = similar_ctx([20, 14])
    before = ctx.cache.keys().clone()
    KVMerger(threshold=0.0, window=4, budget=20).on_prefill(ctx)
    assert torch.equal(ctx.cache.keys(), before) and ctx.cache.version == 0


def test_merged_entries_at_pivot_positions_and_length_formula():
    lengths = [30, 24]
    ctx, ref = similar_ctx(lengths), similar_ctx(lengths)
    ctx.kv = SimpleNamespace(layers=[ctx.cache] * 3)
    m = KVMerger(threshold=0.95, window=4, budget=0.9)
    votes = window_votes(ref, 4, "sum")
    m.on_prefill(ctx)
    assert ctx.state["merged_sets"] > 0
    n = torch.tensor(lengths)
    for b in range(2):
        cap = int(0.9 * lengths[b])
        for h in range(2):
            # naive reference for this row: sets over the non-window prefix, then top-`cap` by set score
            length = lengths[b]
            keys = ref.cache.keys()[b, h, :length]
            cand = torch.arange(length) < length - 4
            sid = merge_set_ids(adjacent_cosine(keys[None]), cand[None], 0.95)
            res = merge_runs(
                keys[None], ref.cache.values()[b, h, :length][None], votes[b, h, :length][None], sid
            )
            sets = int(sid.max()) + 1
            assert int(ctx.cache.lengths[b, h]) == min(cap, length - int((res.sizes - 1).sum()))
            assert sets == length - int((res.sizes - 1).sum())
            pos = ctx.cache.positions()[b, h, : int(ctx.cache.lengths[b, h])].tolist()
            pivots = sorted(int(p) for p in res.pivot)
            assert set(pos) <= set(pivots) and list(range(length - 4, length)) == pos[-4:]
            for j, p in enumerate(pos):
                s = int(sid[0, p])
                torch.testing.assert_close(ctx.cache.keys()[b, h, j], res.keys[s])
                torch.testing.assert_close(ctx.cache.values()[b, h, j], res.values[s])
    assert bool((ctx.cache.lengths <= n[:, None]).all())
    assert isinstance(ctx.cache, RaggedCache)  # heads of different lengths, stored without padding
    assert ctx.cache.nbytes() == ragged_cache_bytes(ctx.cache.lengths, 8, 4, ctx.cache.tail)
