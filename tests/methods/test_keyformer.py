"""Keyformer oracles (card: shared/methods/keyformer.md)."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv import ConfigError
from mpckv.plaintext.methods.keyformer import Keyformer, gumbel_noise, noisy_column_scores

from .test_snapkv import make_ctx


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _positions(session):
    return [lc.pos[:, :, : lc.max_length].clone() for lc in session.cache.layers]


def _run(model, method, prompts, steps=6):
    eng = mpckv.Engine(model, method)
    s = eng.prefill(prompts)
    logits = [s.logits]
    snaps = [_positions(s)]
    for _ in range(steps):
        logits.append(eng.decode(s, s.logits.argmax(-1)))
        snaps.append(_positions(s))
    return s, logits, snaps


def test_no_noise_unit_temperature_equals_h2o(tiny_random_model):
    prompts = [_prompt(40), _prompt(27, 1)]
    kf = Keyformer(budget=12, recent_fraction=0.3, noise_scale=0.0, tau_init=1.0, tau_end=1.0)
    h2o = mpckv.get_method("h2o", budget=12, recent_fraction=0.3)
    s1, l1, p1 = _run(tiny_random_model, kf, prompts)
    s2, l2, p2 = _run(tiny_random_model, h2o, prompts)
    for a, b in zip(l1, l2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(p1, p2, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_own_score_path_matches_plain_column_sums():
    """Without noise at τ = 1 the chunked noisy scorer equals the shared window scorer (all queries)."""
    from mpckv.plaintext.methods.scorers import window_votes

    ctx, _, _ = make_ctx([300, 211])
    ref = window_votes(ctx, 10_000, per_query_head=True)
    got = noisy_column_scores(ctx.q, ctx.cache.keys(), ctx.prompt_lengths, ctx.scale, 1.0, 0.0, 0, ctx.layer)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # every real query contributes mass 1
    torch.testing.assert_close(got.sum(-1), ctx.prompt_lengths[:, None].float().expand(2, 4))


def test_noisy_scores_keep_unit_mass_and_change_with_temperature():
    ctx, _, _ = make_ctx([64])
    a = noisy_column_scores(ctx.q, ctx.cache.keys(), ctx.prompt_lengths, ctx.scale, 1.0, 1.0, 3, 0)
    b = noisy_column_scores(ctx.q, ctx.cache.keys(), ctx.prompt_lengths, ctx.scale, 2.0, 1.0, 3, 0)
    torch.testing.assert_close(a.sum(-1), torch.full((1, 4), 64.0))
    torch.testing.assert_close(b.sum(-1), torch.full((1, 4), 64.0))
    assert not torch.allclose(a, b)
    # a higher temperature flattens the distribution: smaller spread of the column sums
    assert float(b.std()) < float(a.std())


def test_gumbel_noise_is_a_pure_function_with_gumbel_moments():
    h = torch.arange(4)[:, None, None]
    q = torch.arange(64)[None, :, None]
    k = torch.arange(64)[None, None, :]
    z1, z2 = gumbel_noise(7, 1, h, q, k), gumbel_noise(7, 1, h, q, k)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, gumbel_noise(8, 1, h, q, k))
    assert not torch.equal(z1, gumbel_noise(7, 2, h, q, k))
    assert torch.isfinite(z1).all()
    # Gumbel(0, 1): mean = Euler–Mascheroni ≈ 0.5772, variance = π²/6 ≈ 1.645
    assert abs(float(z1.mean()) - 0.5772) < 0.03
    assert abs(float(z1.var()) - 1.6449) < 0.08


def test_temperature_schedule_is_linear_and_ends_at_tau_end():
    m = Keyformer(tau_init=1.0, tau_end=2.0, max_new_tokens=8)
    assert m.tau(None) == 1.0
    assert [m.tau(s) for s in range(8)] == pytest.approx([1 + (s + 1) / 8 for s in range(8)])
    assert m.tau(7) == 2.0 and m.tau(20) == 2.0


def test_fixed_seed_repeats_sizes_recent_window_and_no_return(tiny_random_model):
    prompts = [_prompt(40, 5)]
    m = Keyformer(budget=10, recent_fraction=0.3, seed=11)
    s1, l1, p1 = _run(tiny_random_model, m, prompts)
    _s2, l2, p2 = _run(tiny_random_model, m, prompts)
    for a, b in zip(l1, l2, strict=True):
        assert torch.equal(a, b)
    for step, snap in enumerate(p1):
        newest = 40 + step  # positions 0 .. newest-1 exist
        for pos in snap:
            assert pos.shape[-1] == 10  # cache length = k after prefill and after every decode step
            for row in pos.reshape(-1, 10).tolist():
                recent = set(range(newest - 3, newest))
                assert recent <= set(row), "the recent window is always kept"
    # discarded tokens never come back
    for prev, nxt in zip(p1, p1[1:], strict=False):
        for a, b in zip(prev, nxt, strict=True):
            for ra, rb in zip(a.reshape(-1, 10).tolist(), b.reshape(-1, 10).tolist(), strict=True):
                assert set(rb) <= set(ra) | {max(rb)}
    # a different seed keeps the same sizes but (here) a different set somewhere
    other = _run(tiny_random_model, Keyformer(budget=10, recent_fraction=0.3, seed=12), prompts)[2]
    assert all(x.shape == y.shape for a, b in zip(p1, other, strict=True) for x, y in zip(a, b, strict=True))
    assert any(
        not torch.equal(x, y) for a, b in zip(p1, other, strict=True) for x, y in zip(a, b, strict=True)
    )


def test_bad_hyper_parameters_raise():
    with pytest.raises(ConfigError):
        Keyformer(tau_init=0.0)
    with pytest.raises(ConfigError):
        Keyformer(noise_scale=-1.0)
    with pytest.raises(ConfigError):
        Keyformer(recent_fraction=1.5)
