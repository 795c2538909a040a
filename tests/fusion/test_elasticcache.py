"""Elastic-Cache's drift-triggered refresh (adapted to fused chunk caches): the card's oracles."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion.elasticcache import ElasticCache, chunk_drift
from mpckv.plaintext.fusion.selector import SelectInput

from .helpers import make_model, rand_ids
from .test_fusion_oracles import _concat_reference, assert_same_as_full

LENS = (20, 17, 25)
Q = 6


def segments(seed=0):
    return [Chunk(rand_ids(n, seed + i + 1)) for i, n in enumerate(LENS)] + [Raw(rand_ids(Q, seed + 9))]


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_threshold_zero_is_full_prefill(rope):
    m = make_model(rope)
    out = mpckv.Engine(m).prefill_segments(segments(), "elasticcache", threshold=0.0)
    assert out.stats.recompute_ratio == 1.0
    assert_same_as_full(m, out, segments())


def test_threshold_above_two_is_pure_reuse(model):
    segs = segments(3)
    out = mpckv.Engine(model).prefill_segments(segs, "elasticcache", threshold=2.5, check_writeback=False)
    ref, logits = _concat_reference(model, segs)
    assert out.stats.recomputed_cached == 0
    torch.testing.assert_close(out.session.logits, logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.session.cache.layers, ref.cache.layers, strict=True):
        torch.testing.assert_close(a.values(), b.values(), atol=1e-4, rtol=1e-4)


class _Spy(ElasticCache):
    seen: list = []

    def choose(self, inp):
        _Spy.seen.append(inp)
        return super().choose(inp)


def _inp(model, seed=5) -> SelectInput:
    _Spy.seen.clear()
    mpckv.Engine(model).prefill_segments(segments(seed), _Spy())
    return _Spy.seen[0]


def test_drift_matches_naive_reference(model):
    inp = _inp(model)
    got = chunk_drift(inp)
    n = inp.prompt.num_tokens
    qrows = list(range(sum(LENS), n))
    h = inp.q.shape[0]
    g = h // inp.k.shape[0]
    k_old = inp.k_old.clone()
    k_old[:, sum(LENS) :] = inp.k[:, sum(LENS) :]

    def probs(keys):
        out = torch.zeros(h, len(qrows), n)
        for hh in range(h):
            for i, r in enumerate(qrows):
                s = inp.q[hh, r] @ keys[hh // g, : r + 1].T * inp.scale
                out[hh, i, : r + 1] = torch.softmax(s, -1)
        return out

    a_old, a_new = probs(k_old), probs(inp.k)
    col = a_old.sum(dim=(0, 1))
    starts = [0, LENS[0], LENS[0] + LENS[1]]
    for (s, e, d), s0, ln in zip(got, starts, LENS, strict=True):
        assert (s, e) == (s0, s0 + ln)
        t = s + int(col[s:e].argmax())
        x, y = a_new[:, :, t].flatten(), a_old[:, :, t].flatten()
        assert d == pytest.approx(1 - float(x @ y / (x.norm() * y.norm())), abs=1e-5)
    assert got[0][2] >= 0


def test_monotone_in_threshold_and_cap(model):
    inp = _inp(model, 7)
    drifts = [d for _, _, d in chunk_drift(inp)]
    counts = []
    for thr in sorted({0.0, *drifts, 2.5}):
        rows = ElasticCache(threshold=thr).choose(inp)
        counts.append(rows.numel())
        want = [i for (s, e, d) in chunk_drift(inp) if d >= thr for i in range(s, e)]
        assert rows.tolist() == want
    assert counts == sorted(counts, reverse=True)  # a higher threshold never refreshes more
    capped = ElasticCache(threshold=0.0, ratio=0.4)
    inp.budget = capped.budget_for(inp.prompt.num_cached)
    rows = capped.choose(inp)
    assert 0 < rows.numel() <= inp.budget
    worst = max(chunk_drift(inp), key=lambda x: x[2])
    assert set(range(worst[0], worst[1])) <= set(rows.tolist())
