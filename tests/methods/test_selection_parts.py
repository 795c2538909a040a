"""Shared selection parts: each against a naive reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.kernels.page_bounds import page_minmax
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.selection_parts import (
    assemble,
    blocks_to_tokens,
    forced_split,
    head_scores,
    max_over_heads,
    page_bounds,
    pool_blocks,
    query_reuse,
    shared_layout,
    soft_vote,
    union_ids,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=15)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_head_scores_matches_loop():
    g = _gen(0)
    q, k = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    s = head_scores(q, k, 0.5)
    for b in range(2):
        for h in range(6):
            ref = 0.5 * (k[b, h // 2] @ q[b, h])
            torch.testing.assert_close(s[b, h // 2, h % 2], ref)


def test_soft_vote_sums_to_heads_and_h1_is_raw_ranking():
    g = _gen(1)
    s = torch.randn(2, 3, 4, 10, generator=g)
    s[..., 7:] = float("-inf")  # non-candidates
    shared = soft_vote(s, share=True)
    torch.testing.assert_close(shared.sum(-1), torch.full((2, 3), 12.0))
    assert bool((shared == shared[:, :1]).all()) and bool((shared[..., 7:] == 0).all())
    torch.testing.assert_close(soft_vote(s, share=False).sum(-1), torch.full((2, 3), 4.0))
    one = torch.randn(1, 1, 1, 10, generator=g)
    assert torch.equal(soft_vote(one, True)[0, 0].argsort(), one[0, 0, 0].argsort())


def test_max_over_heads_and_pool_blocks():
    g = _gen(2)
    p = torch.rand(2, 4, 11, generator=g)
    m = max_over_heads(p, 2, share=False)
    torch.testing.assert_close(m[:, 1], p[:, 2:].amax(1))
    torch.testing.assert_close(max_over_heads(p, 2, share=True)[:, 0], p.amax(1))
    pooled = pool_blocks(p, 4, "sum")
    assert pooled.shape == (2, 4, 3)
    torch.testing.assert_close(pooled[..., 2], p[..., 8:].sum(-1))
    torch.testing.assert_close(pool_blocks(p, 4, "max", fill=-1.0)[..., 1], p[..., 4:8].amax(-1))


def test_blocks_to_tokens_drops_tail_and_padding():
    blocks = torch.tensor([[[0, 2, 0]]])
    valid = torch.tensor([[[True, True, False]]])
    idx, ok = blocks_to_tokens(blocks, valid, 4, torch.tensor([[10]]))
    assert idx[ok].tolist() == [0, 1, 2, 3, 8, 9]


@SETTINGS
@given(n=st.integers(4, 40), sinks=st.integers(0, 4), window=st.integers(0, 6), seed=st.integers(0, 50))
def test_assemble_is_sorted_union(n, sinks, window, seed):
    sinks, window = min(sinks, n), min(window, n - min(sinks, n))
    g = _gen(seed)
    top = torch.randint(0, n, (1, 1, 5), generator=g).unique(dim=-1)
    ok = torch.rand(top.shape, generator=g) > 0.3
    lengths = torch.tensor([[n]])
    idx, val = assemble(lengths, torch.tensor([[sinks]]), torch.tensor([[window]]), top, ok)
    want = set(range(sinks)) | set(range(n - window, n))
    want |= {t for t, o in zip(top.flatten().tolist(), ok.flatten().tolist(), strict=True) if o}
    got = idx[val].tolist()
    assert got == sorted(want)
    assert bool(val[..., : len(got)].all())


@SETTINGS
@given(n=st.integers(1, 50), seed=st.integers(0, 50))
def test_union_ids_matches_set_union(n, seed):
    g = _gen(seed)
    ids = torch.randint(0, n, (2, 3, 7), generator=g)
    ok = torch.rand(2, 3, 7, generator=g) > 0.4
    start = torch.randint(0, n, (2, 3), generator=g)
    stop = torch.minimum(start + torch.randint(0, 4, (2, 3), generator=g), torch.tensor(n))
    idx, val = union_ids(n, [(ids, ok)], [(start, stop)])
    for b in range(2):
        for h in range(3):
            want = {int(t) for t, o in zip(ids[b, h], ok[b, h], strict=True) if o}
            want |= set(range(int(start[b, h]), int(stop[b, h])))
            row = idx[b, h][val[b, h]].tolist()
            assert row == sorted(want)
            assert bool(val[b, h, : len(row)].all()) and not bool(val[b, h, len(row) :].any())


def test_query_reuse():
    g = _gen(3)
    q = torch.randn(2, 4, 8, generator=g)
    assert not bool(query_reuse(q, None, 0.9).any())
    assert bool(query_reuse(q, q.clone(), 0.9).all())
    assert not bool(query_reuse(q, q.clone(), 1.5).any())
    other = q.clone()
    other[1] = -other[1]
    assert query_reuse(q, other, 0.9).tolist() == [True, False]


def test_page_bounds_incremental_equals_rebuild_and_layout():
    g = _gen(4)
    cache = LayerCache(1, 2, 4, torch.float32, torch.device("cpu"))
    cache.append(
        torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g), torch.arange(9)[None]
    )
    state: dict[str, object] = {}
    page_bounds(cache, state, 4)
    for t in range(9, 14):
        cache.append(
            torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g), torch.tensor([[t]])
        )
        kmin, kmax = page_bounds(cache, state, 4)
        rmin, rmax = page_minmax(cache.keys(), cache.lengths, 4)
        torch.testing.assert_close(kmin, rmin)
        torch.testing.assert_close(kmax, rmax)
    assert shared_layout(cache)
    cache.compact(torch.tensor([[[0, 1], [2, 3]]]))
    assert not shared_layout(cache)


def test_forced_split_caps_small_budgets():
    assert forced_split(2688, 128, 512) == (128, 512)
    assert forced_split(12, 128, 512) == (3, 3)
