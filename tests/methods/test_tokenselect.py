"""TokenSelect (Wu et al., EMNLP 2025): the card's oracles against a naive soft-voting reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.config import ModelConfig
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext
from mpckv.plaintext.methods.selection_parts import forced_split
from mpckv.plaintext.methods.tokenselect import TokenSelect
from mpckv.registry import get_method

CFG = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
SETTINGS = settings(derandomize=True, deadline=None, max_examples=12)


def make_ctx(b: int, hk: int, heads: int, n: int, d: int = 8, seed: int = 0) -> DecodeContext:
    g = torch.Generator().manual_seed(seed)
    cache = LayerCache(b, hk, d, torch.float32, torch.device("cpu"))
    cache.append(torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g),
                 torch.arange(n).expand(b, n))  # fmt: skip
    q = torch.randn(b, heads, d, generator=g)
    return DecodeContext(0, CFG, cache, q, torch.full((b,), n - 1), 0, d**-0.5, {})


def naive(
    q: torch.Tensor, k: torch.Tensor, budget: int, n_init: int, n_local: int, scale: float
) -> list[int]:
    """One sequence: q [H, d], k [Hk, n, d] → the sorted selected ids (per-head softmax, summed)."""
    h, n = q.shape[0], k.shape[1]
    g = h // k.shape[0]
    ni, nl = forced_split(budget, n_init, n_local)
    cand = list(range(ni, n - nl))
    vote = [0.0] * len(cand)
    for head in range(h):
        s = [scale * float(q[head] @ k[head // g, t]) for t in cand]
        m = max(s)
        e = [math.exp(x - m) for x in s]
        z = sum(e)
        vote = [v + x / z for v, x in zip(vote, e, strict=True)]
    best = sorted(range(len(cand)), key=lambda j: (-vote[j], j))[: budget - ni - nl]
    return sorted(set(range(ni)) | {cand[j] for j in best} | set(range(n - nl, n)))


def test_registered():
    m = get_method("tokenselect")
    assert isinstance(m, TokenSelect) and m.family == "selection" and "2411.02886" in m.paper
    assert (m.n_init, m.n_local, m.cache_theta, m.vote_scale) == (128, 512, 0.9, 1.0)


@SETTINGS
@given(
    n=st.integers(20, 70), budget=st.integers(4, 19), heads=st.sampled_from([2, 4]), seed=st.integers(0, 99)
)
def test_matches_naive_reference(n, budget, heads, seed):
    ctx = make_ctx(1, 2, heads, n, seed=seed)
    m = TokenSelect(budget=budget, n_init=3, n_local=4, prefilter=0.0, cache_theta=2.0, vote_scale=0.3)
    sel = m.select(ctx)
    assert sel is not None
    want = naive(ctx.q[0], ctx.cache.keys()[0], budget, 3, 4, 0.3)
    for h in range(2):  # the same set for every KV head, sorted, no duplicates, |S| = budget
        got = sel.index[0, h][sel.valid[0, h]].tolist()
        assert got == want and len(got) == budget


def test_dense_when_budget_covers_and_h1_raw_topk():
    ctx = make_ctx(1, 1, 1, 30)
    assert TokenSelect(budget=30).select(ctx) is None
    m = TokenSelect(budget=10, n_init=0, n_local=0, prefilter=0.0, cache_theta=2.0)
    sel = m.select(ctx)
    raw = ctx.cache.keys()[0, 0] @ ctx.q[0, 0]
    assert sel is not None and sel.index[0, 0].tolist() == sorted(raw.topk(10).indices.tolist())


def test_ragged_batch_rows_equal_single_rows():
    g = torch.Generator().manual_seed(5)
    d, n = 8, 40
    cache = LayerCache(2, 2, d, torch.float32, torch.device("cpu"))
    cache.append(torch.randn(2, 2, n, d, generator=g), torch.randn(2, 2, n, d, generator=g),
                 torch.arange(n).expand(2, n))  # fmt: skip
    cache.lengths = torch.tensor([[40, 40], [27, 27]])
    q = torch.randn(2, 4, d, generator=g)
    m = TokenSelect(budget=0.3, n_init=2, n_local=3, prefilter=0.0, cache_theta=2.0)
    both = m.select(DecodeContext(0, CFG, cache, q, torch.tensor([39, 26]), 0, 0.35, {}))
    assert both is not None
    for b, length in enumerate((40, 27)):
        want = naive(q[b], cache.keys()[b, :, :length], m.resolved_budget.tokens_for(length), 2, 3, 1.0)
        assert both.index[b, 0][both.valid[b, 0]].tolist() == want


def test_prefilter_covering_every_page_is_exact_and_partial_is_subset():
    ctx = make_ctx(1, 2, 4, 64, seed=3)
    exact = TokenSelect(budget=16, n_init=2, n_local=2, prefilter=0.0, cache_theta=2.0).select(ctx)
    wide = TokenSelect(budget=16, n_init=2, n_local=2, prefilter=100.0, prefilter_page=4, cache_theta=2.0)
    narrow = TokenSelect(budget=16, n_init=2, n_local=2, prefilter=1.5, prefilter_page=4, cache_theta=2.0)
    assert exact is not None
    w, nw = wide.select(make_ctx(1, 2, 4, 64, seed=3)), narrow.select(make_ctx(1, 2, 4, 64, seed=3))
    assert w is not None and nw is not None
    assert torch.equal(w.index, exact.index)
    got = nw.index[0, 0][nw.valid[0, 0]].tolist()
    assert len(got) == 16 and got == sorted(set(got)) and {0, 1, 62, 63} <= set(got)


def test_selection_cache_reuses_top_part_while_query_is_similar():
    ctx = make_ctx(1, 2, 4, 50, seed=7)
    m = TokenSelect(budget=12, n_init=2, n_local=2, prefilter=0.0, cache_theta=0.9)
    first = m.select(ctx)
    assert first is not None
    ctx.cache.k[:, :, :50] = torch.randn(1, 2, 50, 8)  # other keys, same query: a hit ignores them
    again = m.select(ctx)
    assert again is not None and torch.equal(again.index, first.index)
    ctx.q = -ctx.q  # cosine -1: a miss, recomputed on the new keys
    fresh = m.select(ctx)
    want = naive(ctx.q[0], ctx.cache.keys()[0], 12, 2, 2, 1.0)
    assert fresh is not None and fresh.index[0, 0].tolist() == want


@pytest.mark.parametrize("theta", [0.9, 2.0])
def test_engine_runs_and_full_budget_is_dense(tiny_random_model, theta):
    prompt = torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = Engine(tiny_random_model).generate([prompt], 5, stop_tokens=[])
    full = Engine(tiny_random_model, "tokenselect", budget=64, cache_theta=theta).generate(
        [prompt], 5, stop_tokens=[]
    )
    assert full.tokens == dense.tokens
    small = Engine(tiny_random_model, "tokenselect", budget=8, cache_theta=theta).generate(
        [prompt], 5, stop_tokens=[]
    )
    assert len(small.tokens[0]) == 5
