"""WindowKV oracles (card: shared/methods/windowkv.md)."""

from __future__ import annotations

import math

import pytest
import torch

import mpckv
from mpckv import ConfigError
from mpckv.plaintext.methods import windowkv as wk
from mpckv.plaintext.methods.scorers import window_votes
from mpckv.plaintext.methods.windowkv import WindowKV, group_budgets, window_scores

from .test_snapkv import make_ctx


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    ("c", "expected"),
    [(2048, [2926, 2341, 1756, 1170]), (1024, [1463, 1171, 879, 585]), (512, [732, 586, 440, 292])],
)
def test_group_budget_schedule_matches_the_paper_example(c, expected):
    got = group_budgets(c, 32, 8, 14.0, review=100_000)
    assert got == expected
    assert abs(sum(got) / len(got) - c) < 2


def test_group_budgets_clamp_at_the_review_length():
    assert group_budgets(100, 32, 8, 14.0, review=120) == [120, 107, 94, 80]  # first clamped, mean kept
    assert all(x >= 90 for x in group_budgets(100, 32, 8, 14.0, review=90))
    assert group_budgets(50, 4, 8, 14.0, review=10) == [50]


def _naive_window_scores(votes, review, size, strategy):
    b, h, _ = votes.shape
    out = []
    for i in range(b):
        r = int(review[i])
        row = []
        for u in range(math.ceil(r / size)):
            seg = votes[i, :, u * size : min((u + 1) * size, r)]
            if strategy == "average":
                row.append(float(seg.mean()))
            else:
                top = torch.topk(seg, min(size // 2, seg.shape[-1]), dim=-1).values
                row.append(float(top.mean(-1).mean()))
        out.append(row)
    return out


@pytest.mark.parametrize("strategy", ["average", "max"])
def test_window_scores_match_a_naive_loop(strategy):
    g = torch.Generator().manual_seed(0)
    votes = torch.rand(2, 4, 45, generator=g)
    review = torch.tensor([45, 30])
    got = window_scores(votes, review, 8, strategy)
    ref = _naive_window_scores(votes, review, 8, strategy)
    for i, row in enumerate(ref):
        torch.testing.assert_close(got[i, : len(row)], torch.tensor(row), rtol=1e-5, atol=1e-6)
        assert torch.isinf(got[i, len(row) :]).all()


def _kept_positions(ctx):
    c = ctx.cache
    return [[c.pos[b, h, : int(c.lengths[b, h])].tolist() for h in range(c.kv_heads)] for b in range(c.batch)]


@pytest.mark.parametrize("task", ["qa", "other"])
def test_kept_set_is_whole_windows_plus_suffix_within_budget(task):
    n = [120, 77]
    ctx, _q, _k = make_ctx(n, layers=1)
    m = WindowKV(task=task, window_size=8, budget=40)
    s = m.suffix_len
    m.on_prefill(ctx)
    for b, rows in enumerate(_kept_positions(ctx)):
        assert rows[0] == rows[1], "one selection shared by the KV heads"
        r = n[b] - s
        kept = rows[0]
        assert kept == sorted(kept)
        assert set(range(r, n[b])) <= set(kept), "suffix always kept"
        review = [p for p in kept if p < r]
        for u in {p // 8 for p in review}:
            assert set(range(u * 8, min(u * 8 + 8, r))) <= set(review), "whole windows only"
        c = 40 - s
        assert c - 8 < len(review) < c + 8


def test_scoring_reducer_picks_top_windows():
    ctx, _q, _k = make_ctx([64], layers=1, seed=3)
    m = WindowKV(task="qa", window_size=8, suffix=8, budget=8 + 24)
    votes = window_votes(ctx, 8, per_query_head=True)
    scores = window_scores(votes, torch.tensor([56]), 8, "max")[0]
    m.on_prefill(ctx)
    kept = _kept_positions(ctx)[0][0]
    top3 = sorted(torch.sort(scores, descending=True, stable=True).indices[:3].tolist())
    assert kept == [p for u in top3 for p in range(u * 8, u * 8 + 8)] + list(range(56, 64))


def test_equal_votes_keep_the_lower_windows():
    ctx, _q, _k = make_ctx([64], layers=1, zero_qk=True)
    WindowKV(task="other", window_size=8, suffix=16, budget=16 + 16).on_prefill(ctx)
    assert _kept_positions(ctx)[0][0] == list(range(16)) + list(range(48, 64))


def test_short_prompt_is_untouched():
    ctx, _q, k = make_ctx([30], layers=1)
    WindowKV(budget=40).on_prefill(ctx)
    assert ctx.cache.version == 0 and ctx.cache.lengths.tolist() == [[30, 30]]


def test_layers_of_a_group_share_indices_and_only_the_first_scores(tiny_random_model, monkeypatch):
    calls = []
    real = wk.window_votes

    def counting(ctx, *a, **kw):
        calls.append(ctx.layer)
        return real(ctx, *a, **kw)

    monkeypatch.setattr(wk, "window_votes", counting)
    eng = mpckv.Engine(tiny_random_model, WindowKV(window_size=4, suffix=4, group_size=2, budget=16))
    s = eng.prefill([_prompt(60), _prompt(41, 1)])
    assert calls == [0, 2]
    p0, p1 = (s.cache.layers[i].positions() for i in (0, 1))
    assert torch.equal(p0, p1) and torch.equal(s.cache.layers[0].lengths, s.cache.layers[1].lengths)
    assert s.cache.layers[2].lengths.max() < 60


def test_bad_hyper_parameters_raise():
    with pytest.raises(ConfigError):
        WindowKV(task="summary")
    with pytest.raises(ConfigError):
        WindowKV(strategy="min")
    with pytest.raises(ConfigError):
        WindowKV(window_size=0)
