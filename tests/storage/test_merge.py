"""KVMerger's segment ops against a naive loop: set formation, pivots, Gaussian weights, merged vectors."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.plaintext.storage.merge import adjacent_cosine, merge_runs, merge_set_ids


def naive_sets(keys, candidate, threshold):
    """Per row: a list of sets (lists of indices) by a plain scan."""
    rows = []
    for r in range(keys.shape[0]):
        sets, cur = [], []
        for j in range(keys.shape[1]):
            if cur and candidate[r, j] and candidate[r, j - 1]:
                a, b = keys[r, j - 1].double(), keys[r, j].double()
                den = float(a.norm() * b.norm())
                cos = float(a @ b) / den if den > 0 else 0.0
                if cos >= threshold:
                    cur.append(j)
                    continue
            if cur:
                sets.append(cur)
            cur = [j]
        sets.append(cur)
        rows.append(sets)
    return rows


def naive_merge(k, v, a, members, sigma=0.0):
    p = max(members, key=lambda i: (float(a[i]), -i))
    d2 = [float((k[p] - k[i]).double().pow(2).sum()) for i in members]
    s2 = sigma * sigma if sigma > 0 else max(sum(d2) / len(d2), 1e-6)
    g = [math.exp(-x / (2 * s2)) for x in d2]
    w = [x / sum(g) for x in g]
    km = sum(wi * k[i].double() for wi, i in zip(w, members, strict=True))
    vm = sum(wi * v[i].double() for wi, i in zip(w, members, strict=True))
    return p, w, km, vm


def runs_of_similar_keys(seed, rows, length, d):
    """Keys with runs of near-duplicates so that sets of several sizes form."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, length, d, generator=g)
    hold = torch.rand(rows, length, generator=g) < 0.6
    for j in range(1, length):
        base[:, j] = torch.where(
            hold[:, j, None], base[:, j - 1] + 0.05 * torch.randn(rows, d, generator=g), base[:, j]
        )
    return base, torch.randn(rows, length, d, generator=g), torch.rand(rows, length, generator=g)


@settings(derandomize=True, deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 10_000), length=st.integers(1, 14), threshold=st.sampled_from([0.5, 0.9, 0.99, 1.5])
)
def test_sets_and_merged_vectors_equal_naive_loop(seed, length, threshold):
    rows, d = 3, 5
    k, v, a = runs_of_similar_keys(seed, rows, length, d)
    cand = torch.rand(rows, length, generator=torch.Generator().manual_seed(seed + 1)) < 0.85
    sid = merge_set_ids(adjacent_cosine(k), cand, threshold)
    res = merge_runs(k, v, a, sid)
    want = naive_sets(k, cand, threshold)
    flat_sets = [[r * length + j for j in s] for r, sets in enumerate(want) for s in sets]
    assert int(sid.max()) + 1 == len(flat_sets)
    kf, vf, af = k.reshape(-1, d), v.reshape(-1, d), a.reshape(-1)
    for s_idx, members in enumerate(flat_sets):
        assert sid.reshape(-1)[members].tolist() == [s_idx] * len(members)
        p, w, km, vm = naive_merge(kf, vf, af, members)
        assert int(res.pivot[s_idx]) == p
        torch.testing.assert_close(
            res.weight[members].double(), torch.tensor(w, dtype=torch.float64), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(res.keys[s_idx].double(), km, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.values[s_idx].double(), vm, atol=1e-5, rtol=1e-5)
        if len(members) == 1:  # singletons are copied bit-exact
            assert torch.equal(res.keys[s_idx], kf[members[0]])


def test_weight_properties_and_sigma_limits():
    k, v, a = runs_of_similar_keys(7, 2, 12, 4)
    sid = merge_set_ids(adjacent_cosine(k), torch.ones(2, 12, dtype=torch.bool), 0.9)
    res = merge_runs(k, v, a, sid)
    sums = torch.zeros(int(sid.max()) + 1).index_add_(0, sid.reshape(-1), res.weight)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    for s in range(sums.numel()):
        members = (sid.reshape(-1) == s).nonzero().flatten()
        assert float(res.weight[res.pivot[s]]) == float(res.weight[members].max())
    wide = merge_runs(k, v, a, sid, sigma=1e6)  # σ → ∞: plain mean
    mean = torch.zeros_like(wide.keys).index_add_(0, sid.reshape(-1), k.reshape(-1, 4)) / wide.sizes[:, None]
    torch.testing.assert_close(wide.keys, mean, atol=1e-5, rtol=1e-5)
    narrow = merge_runs(k, v, a, sid, sigma=1e-4)  # σ → 0: the pivot itself
    torch.testing.assert_close(narrow.keys, k.reshape(-1, 4)[narrow.pivot])


def test_identical_keys_merge_to_that_key():
    k = torch.ones(1, 6, 3) * torch.tensor([1.0, -2.0, 0.5])
    v = torch.arange(18.0).view(1, 6, 3)
    a = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.0, 0.3]])
    sid = merge_set_ids(adjacent_cosine(k), torch.ones(1, 6, dtype=torch.bool), 0.99)
    res = merge_runs(k, v, a, sid)
    assert sid.tolist() == [[0] * 6] and int(res.pivot[0]) == 1  # tie at 0.5 → lower index
    torch.testing.assert_close(res.keys[0], k[0, 0])
    torch.testing.assert_close(res.values[0], v[0].mean(0))
