"""CTkvr (Lu et al. 2025): qcIVF index and two-stage retrieval against brute force."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.config import ModelConfig
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
from mpckv.plaintext.methods.ctkvr import CTkvr
from mpckv.registry import get_method

CFG = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
SETTINGS = settings(derandomize=True, deadline=None, max_examples=10)
D = 8


def setup(m: CTkvr, n: int, heads: int = 4, hk: int = 2, seed: int = 0, plen: list[int] | None = None):
    """Prefill ``m`` on a random cache; returns (prefill ctx, state)."""
    g = torch.Generator().manual_seed(seed)
    b = 1 if plen is None else len(plen)
    plen = plen or [n]
    cache = LayerCache(b, hk, D, torch.float32, torch.device("cpu"))
    cache.append(torch.randn(b, hk, n, D, generator=g), torch.randn(b, hk, n, D, generator=g),
                 torch.arange(n).expand(b, n))  # fmt: skip
    cache.lengths = torch.tensor(plen)[:, None].expand(b, hk).clone()
    q = torch.randn(b, heads, n, D, generator=g)
    state: dict = {}
    ctx = PrefillContext(0, CFG, cache, q, torch.tensor(plen), D**-0.5, state, torch.ones(1))
    m.on_prefill(ctx)
    return ctx, state


def decode_ctx(pctx: PrefillContext, q: torch.Tensor) -> DecodeContext:
    return DecodeContext(0, CFG, pctx.cache, q, pctx.prompt_lengths, 0, pctx.scale, pctx.state)


def test_registered():
    m = get_method("ctkvr")
    assert isinstance(m, CTkvr) and m.family == "selection" and "2512.15550" in m.paper
    assert (m.centroids, m.n_probe, m.sinks, m.window) == (64, 2, 4, 64)


@SETTINGS
@given(n=st.integers(6, 40), c=st.integers(1, 6), rho=st.integers(1, 12), seed=st.integers(0, 50))
def test_posting_lists_are_brute_force_top_rho(n, c, rho, seed):
    m = CTkvr(centroids=c, rho_ratio=0.0, rho_min=rho)
    pctx, state = setup(m, n, seed=seed)
    keys, q = pctx.cache.keys()[0], pctx.q[0]
    r = min(rho, n)
    for kv in range(2):
        for j in range(c):
            pos = n - c + j
            if pos < 0:
                assert not bool(state["ctkvr_centroid_ok"][0, j])
                continue
            rows = [
                torch.softmax(pctx.scale * (keys[kv, : pos + 1] @ q[h, pos]), -1)
                for h in (2 * kv, 2 * kv + 1)
            ]
            agg = torch.stack(rows).amax(0)
            want = sorted(sorted(range(pos + 1), key=lambda t: (-float(agg[t]), t))[: min(r, pos + 1)])
            got = state["ctkvr_post"][0, kv, j][state["ctkvr_post_ok"][0, kv, j]].tolist()
            assert got == want


def test_query_equal_to_centroid_gets_its_exact_topk():
    m = CTkvr(budget=6, centroids=4, rho_ratio=0.0, rho_min=10, n_probe=1, sinks=0, window=0)
    pctx, _ = setup(m, 40, heads=2, hk=2, seed=3)
    q = pctx.q[:, :, 38].clone()  # the query at position 38 is centroid 2
    sel = m.select(decode_ctx(pctx, q))
    assert sel is not None
    for kv in range(2):
        exact = pctx.cache.keys()[0, kv] @ q[0, kv]
        assert sel.index[0, kv].tolist() == sorted(exact.topk(6).indices.tolist())


def test_full_lists_equal_exact_topk_with_forced_tokens():
    m = CTkvr(budget=12, centroids=3, rho_ratio=1.0, sinks=2, window=3)
    pctx, _ = setup(m, 30, seed=4)
    q = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(9))
    sel = m.select(decode_ctx(pctx, q))
    assert sel is not None
    keys = pctx.cache.keys()[0]
    for kv in range(2):
        s = torch.maximum(keys[kv] @ q[0, 2 * kv], keys[kv] @ q[0, 2 * kv + 1])
        s[:2] = float("inf")
        s[27:] = float("inf")
        want = sorted(sorted(range(30), key=lambda t: (-float(s[t]), t))[:12])
        assert sel.index[0, kv][sel.valid[0, kv]].tolist() == want


def test_candidates_hold_forced_and_generated_tokens_without_duplicates():
    m = CTkvr(budget=10, centroids=2, rho_ratio=0.0, rho_min=3, n_probe=2, sinks=2, window=2)
    pctx, _ = setup(m, 30, seed=5)
    cache = pctx.cache
    g = torch.Generator().manual_seed(1)
    for t in range(30, 35):  # five generated tokens
        cache.append(
            torch.randn(1, 2, 1, D, generator=g), torch.randn(1, 2, 1, D, generator=g), torch.tensor([[t]])
        )
    ctx = decode_ctx(pctx, torch.randn(1, 4, D, generator=g))
    idx, ok = m.candidates(ctx, torch.full((1, 2), 2))
    for kv in range(2):
        row = idx[0, kv][ok[0, kv]].tolist()
        assert row == sorted(set(row)) and all(0 <= t < 35 for t in row)
        assert {0, 1} | set(range(30, 35)) <= set(row)  # sinks, generated tokens (the window is inside)
        assert len(row) <= 2 + 5 + 2 * 3
    sel = m.select(ctx)
    assert sel is not None and int(sel.counts.min()) == 10


def test_ragged_rows_and_stale_index_fallback():
    m = CTkvr(budget=0.3, centroids=3, rho_ratio=0.2, sinks=1, window=2)
    pctx, _ = setup(m, 40, plen=[40, 23], seed=6)
    q = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(2))
    sel = m.select(decode_ctx(pctx, q))
    assert sel is not None
    for b, n in enumerate((40, 23)):
        row = sel.index[b, 0][sel.valid[b, 0]].tolist()
        assert len(row) == m.resolved_budget.tokens_for(n) and max(row) < n and 0 in row and n - 1 in row
    single, _ = setup(CTkvr(budget=0.3, centroids=3, rho_ratio=0.2, sinks=1, window=2), 40, plen=[40], seed=6)
    one = m.select(decode_ctx(single, q[:1]))
    assert one is not None and one.index[0].tolist() == sel.index[0, :, : one.index.shape[-1]].tolist()
    pctx.cache.version += 1  # compacted after the index was built: exact top-k over the cache
    stale = m.select(decode_ctx(pctx, q))
    assert stale is not None and int(stale.counts[1, 0]) == m.resolved_budget.tokens_for(23)


def test_engine_end_to_end(tiny_random_model):
    prompt = torch.randint(0, 200, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = Engine(tiny_random_model).generate([prompt], 4, stop_tokens=[])
    full = Engine(tiny_random_model, "ctkvr", budget=64, rho_ratio=1.0).generate([prompt], 4, stop_tokens=[])
    assert full.tokens == dense.tokens
    small = Engine(tiny_random_model, "ctkvr", budget=8).generate([prompt], 4, stop_tokens=[])
    assert sum(small.stats.read_per_layer) < sum(dense.stats.read_per_layer)
