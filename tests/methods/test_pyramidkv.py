"""PyramidKV oracles: the per-layer capacity formula (official code / kvpress), SnapKV scoring per layer."""

from __future__ import annotations

import pytest

import mpckv
from mpckv import BudgetError, ConfigError
from mpckv.plaintext.methods.allocators import pyramid_capacities
from mpckv.plaintext.methods.pyramidkv import PyramidKV

from .test_snapkv import assert_dense_equivalent, cache_keep, make_ctx, prompt


def formula(capacity, window, layers, beta, n=None):
    """The paper/kvpress formula in floats, with the official clamp ``max ≥ N − w``."""
    a = capacity - window
    lo = a / beta
    hi = 2 * a - lo
    if n is not None and hi >= n - window:
        hi = n - window
        lo = 2 * a - hi
    return [window + hi - layer * (hi - lo) / (layers - 1) for layer in range(layers)]


@pytest.mark.parametrize(
    ("capacity", "window", "layers", "beta", "n"),
    [
        (100, 8, 4, 20.0, None),
        (2048, 32, 32, 20.0, 100_000),
        (37, 4, 3, 20.0, 500),
        (300, 32, 7, 5.0, None),
        (64, 0, 5, 1.5, 1000),
        (41, 8, 6, 20.0, 60),
    ],
)
def test_capacities_follow_formula(capacity, window, layers, beta, n):
    got = pyramid_capacities(capacity, window, layers, beta, prompt_len=n)
    want = formula(capacity, window, layers, beta, n)
    assert all(abs(g - w) <= 0.5 + 1e-9 for g, w in zip(got, want, strict=True))
    assert sum(got) == capacity * layers, "mean capacity == budget exactly"
    assert got == sorted(got, reverse=True) and got[0] == max(got)
    assert got[0] > got[-1]
    assert all(window <= g <= (n if n is not None else 10**9) for g in got)


def test_official_integer_example_and_clamp():
    # official code, C − w = 200, β = 20: min = 10, max = 390, steps = 380 // 4 = 95
    assert pyramid_capacities(232, 32, 5) == [32 + x for x in (390, 295, 200, 105, 10)]
    # clamp: max = 62.4 ≥ N − w = 52 → max = 52, min = 64 − 52 = 12; the first layer keeps the whole prompt
    assert pyramid_capacities(40, 8, 3, prompt_len=60) == [60, 40, 20]
    # prompts within the budget are kept whole; one layer gets the budget
    assert pyramid_capacities(40, 8, 3, prompt_len=40) == [40, 40, 40]
    assert pyramid_capacities(40, 8, 1) == [40]
    with pytest.raises(BudgetError):
        pyramid_capacities(4, 8, 3)
    with pytest.raises(BudgetError):
        pyramid_capacities(40, 8, 3, beta=0)


def test_engine_per_layer_counts_ragged(tiny_random_model):
    lengths = [40, 26]
    eng = mpckv.Engine(tiny_random_model, "pyramidkv", budget=0.5, window=4, kernel_size=3)
    s = eng.prefill([prompt(n, i) for i, n in enumerate(lengths)])
    want = {40: [35, 20, 5], 26: [22, 13, 4]}  # C = 20 and 13: mean over the 3 layers is C
    for layer, lc in enumerate(s.cache.layers):
        for (b, _h), pos in cache_keep(lc).items():
            n = lengths[b]
            assert len(pos) == want[n][layer]
            assert pos[-4:] == list(range(n - 4, n)), "window kept"
            assert pos == sorted(set(pos))
    for n in lengths:
        assert sum(want[n]) / 3 == n // 2
    means = s.cache.mean_lengths()
    assert means[0] == max(means) and means == sorted(means, reverse=True)


def test_equals_snapkv_with_the_pyramid_as_per_layer_budget(tiny_random_model):
    p = prompt(44, 3)
    caps = [PyramidKV(budget=16, window=4).layer_capacity(44, layer, 3) for layer in range(3)]
    pyr = mpckv.Engine(tiny_random_model, "pyramidkv", budget=16, window=4).prefill([p])
    snap = mpckv.Engine(tiny_random_model, "snapkv", budget=caps, window=4).prefill([p])
    for a, b in zip(pyr.cache.layers, snap.cache.layers, strict=True):
        assert cache_keep(a) == cache_keep(b)
    assert [int(lc.lengths.max()) for lc in pyr.cache.layers] == caps


def test_ties_go_to_lower_index():
    # q = k = 0: every window query attends uniformly, all prefix votes are exactly equal
    for layer in range(3):
        ctx, _, _ = make_ctx([30, 22], layers=3, layer=layer, zero_qk=True)
        m = PyramidKV(budget=12, window=4)
        m.on_prefill(ctx)
        for (b, _h), pos in cache_keep(ctx.cache).items():
            n = (30, 22)[b]
            cap = m.layer_capacity(n, layer, 3)
            assert pos == list(range(cap - 4)) + list(range(n - 4, n))


def test_budget_at_least_prompt_is_dense_and_validation(tiny_random_model):
    assert_dense_equivalent(
        tiny_random_model, "pyramidkv", [prompt(18), prompt(11, 1)], new=3, budget=18, window=4
    )
    with pytest.raises(BudgetError):
        mpckv.Engine(tiny_random_model, "pyramidkv", budget=[10, 8, 6])
    with pytest.raises(ConfigError):
        PyramidKV(beta=0)
