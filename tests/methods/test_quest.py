"""Quest (Tang et al., ICML 2024): page bounds, page selection and engine-level oracles."""

from __future__ import annotations

import pytest
import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError, UnknownMethodError
from mpckv.kernels.page_bounds import num_valid_pages, page_minmax
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods import quest as quest_module
from mpckv.plaintext.methods.base import DecodeContext
from mpckv.plaintext.methods.compose import Composed
from mpckv.plaintext.methods.quest import Quest
from mpckv.plaintext.methods.streamingllm import StreamingLLM
from mpckv.registry import get_method

CFG = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


def make_ctx(lengths: list[list[int]], *, heads: int = 4, d: int = 8, layer: int = 3, seed: int = 0,
             keys: torch.Tensor | None = None) -> DecodeContext:  # fmt: skip
    """A decode context over a random cache with per-(sequence, KV head) ``lengths``."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.long)
    b, hk = lens.shape
    t = int(lens.max())
    cache = LayerCache(b, hk, d, torch.float32, torch.device("cpu"))
    k = torch.randn(b, hk, t, d, generator=gen) if keys is None else keys
    cache.append(k, torch.randn(b, hk, t, d, generator=gen), torch.arange(t).expand(b, t))
    cache.lengths = lens.clone()
    q = torch.randn(b, heads, d, generator=gen)
    return DecodeContext(layer, CFG, cache, q, lens.max(-1).values, 0, d**-0.5, {})


def greedy(engine: Engine, prompts: list[list[int]], steps: int):
    """Greedy decode without stop tokens; returns (tokens [B, steps], logits [steps, B, V], session)."""
    session = engine.prefill(prompts)
    toks, logits = [], []
    for _ in range(steps):
        logits.append(session.logits.clone())
        nxt = session.logits.argmax(-1)
        toks.append(nxt)
        engine.decode(session, nxt)
    return torch.stack(toks, 1), torch.stack(logits), session


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------- configuration
def test_registered_with_defaults():
    m = get_method("quest")
    assert isinstance(m, Quest) and m.family == "selection" and m.secure == "yes"
    assert (m.page_size, m.skip_layers, m.group_reduce, m.sink_page) == (16, 2, "max", False)
    assert "2406.10774" in m.paper


@pytest.mark.parametrize(
    "bad",
    [{"page_size": 0}, {"skip_layers": -1}, {"group_reduce": "min"}, {"min_pages": 0}, {"page_size": 2.0}],
)
def test_bad_parameters(bad):
    with pytest.raises(ConfigError):
        Quest(**bad)


# ---------------------------------------------------------------------------- page bounds
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_bound_holds_for_every_head_of_the_group(reduce):
    ctx = make_ctx([[37, 20], [5, 64]], seed=1)
    m = Quest(budget=8, page_size=4, skip_layers=0, group_reduce=reduce)
    u = m.page_scores(ctx)  # [B, Hk, P]
    b, h, d = ctx.q.shape
    hk, g = ctx.cache.kv_heads, h // ctx.cache.kv_heads
    logits = torch.einsum("bkgd,bktd->bkgt", ctx.q.view(b, hk, g, d), ctx.cache.keys())
    for bi in range(b):
        for kh in range(hk):
            n = int(ctx.cache.lengths[bi, kh])
            npages = -(-n // 4)
            assert torch.isinf(u[bi, kh, npages:]).all()
            for p in range(npages):
                best = logits[bi, kh, :, p * 4 : min(n, p * 4 + 4)].max(-1).values  # per query head
                top = best.max() if reduce == "max" else best.mean()
                assert u[bi, kh, p] >= top - 1e-5
                if reduce == "max":
                    assert (u[bi, kh, p] >= best - 1e-5).all()


def test_bound_is_tight_for_constant_pages():
    keys = torch.randn(1, 2, 4, 8).repeat_interleave(4, dim=2)  # 4 pages of 4 equal keys each
    ctx = make_ctx([[16, 16]], keys=keys)
    u = Quest(budget=4, page_size=4, skip_layers=0).page_scores(ctx)
    exact = torch.einsum("kgd,kpd->kgp", ctx.q.view(2, 2, 8), keys[0, :, ::4]).max(1).values
    torch.testing.assert_close(u[0], exact)


# ---------------------------------------------------------------------------- selection
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [4, 9, 24, 0.3])
def test_selection_invariants(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (3, 2), generator=gen).tolist()
    ctx = make_ctx(lengths, seed=seed)
    m = Quest(budget=budget, page_size=4, skip_layers=0)
    lens = ctx.cache.lengths
    n_valid = num_valid_pages(lens, 4)
    k_pages = m.page_budget(lens, ctx.layer)
    pages = m.select_pages(ctx)
    sel = m.select(ctx)
    if pages is None:
        assert sel is None and bool((n_valid <= k_pages).all())
        return
    assert sel is not None
    pidx, pvalid = pages
    for b, row in enumerate(lengths):
        for h, n in enumerate(row):
            nv = int(n_valid[b, h])
            chosen = pidx[b, h][pvalid[b, h]].tolist()
            assert pvalid[b, h].tolist() == sorted(pvalid[b, h].tolist(), reverse=True)  # valid first
            assert chosen == sorted(set(chosen)) and all(0 <= p < nv for p in chosen)
            assert len(chosen) == min(int(k_pages[b, h]), nv)
            assert nv - 1 in chosen  # the page holding the current token
            if not isinstance(budget, float) and budget < n:
                assert len(chosen) == min(max(1, budget // 4), nv)
            toks = sel.index[b, h][sel.valid[b, h]].tolist()
            expect = [t for p in chosen for t in range(p * 4, min(p * 4 + 4, n))]
            assert toks == expect  # ascending, only valid entries, exactly the chosen pages
            assert sel.valid[b, h].tolist() == sorted(sel.valid[b, h].tolist(), reverse=True)
            assert (sel.index[b, h] < max(n, 1)).all()


def test_ties_go_to_the_lower_page():
    keys = torch.ones(1, 2, 40, 8)  # every page has the same bound
    ctx = make_ctx([[40, 37]], keys=keys)
    pages = Quest(budget=12, page_size=4, skip_layers=0).select_pages(ctx)
    assert pages is not None
    assert pages[0][0, 0].tolist() == [0, 1, 9] and pages[0][0, 1].tolist() == [0, 1, 9]


def test_sink_page_option():
    ctx = make_ctx([[64, 50], [33, 64]], seed=3)
    keys = ctx.cache.k.clone()
    keys[:, :, :4] = -10.0  # page 0 scores low for most queries
    ctx.cache.k = keys
    off = Quest(budget=8, page_size=4, skip_layers=0).select_pages(ctx)
    on = Quest(budget=8, page_size=4, skip_layers=0, sink_page=True).select_pages(ctx)
    assert off is not None and on is not None
    assert (on[0][..., 0] == 0).all() and on[1].sum(-1).eq(2).all()
    last = num_valid_pages(ctx.cache.lengths, 4) - 1
    assert (on[0][..., 1] == last).all()


def test_skip_layers_are_dense():
    m = Quest(budget=4, page_size=4)
    assert m.select(make_ctx([[64, 64]], layer=1)) is None
    assert m.select(make_ctx([[64, 64]], layer=2)) is not None


# ---------------------------------------------------------------------------- engine oracles
@pytest.mark.parametrize("budget", [10_000, 1.0])
def test_budget_covering_everything_is_dense(tiny_random_model, budget):
    p = [prompt(45, 0)]
    t_d, l_d, _ = greedy(Engine(tiny_random_model, "dense"), p, 10)
    t_q, l_q, _ = greedy(Engine(tiny_random_model, Quest(budget=budget, page_size=4, skip_layers=0)), p, 10)
    assert torch.equal(t_d, t_q) and torch.equal(l_d, l_q)


def test_incremental_metadata_matches_recompute(tiny_random_model, monkeypatch):
    calls = []
    real = quest_module.page_minmax
    monkeypatch.setattr(quest_module, "page_minmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(tiny_random_model, Quest(budget=8, page_size=4, skip_layers=0))
    _, _, session = greedy(engine, [prompt(30, 1), prompt(19, 2)], 30)
    assert len(calls) == tiny_random_model.config.num_hidden_layers  # built once per layer, then updated
    for layer, state in enumerate(session.states):
        lc = session.cache[layer]
        kmin, kmax = page_minmax(lc.keys(), lc.lengths, 4)
        n = kmin.shape[2]
        assert torch.equal(state["quest_kmin"][:, :, :n], kmin) and torch.equal(
            state["quest_kmax"][:, :, :n], kmax
        )


def test_metadata_rebuilt_after_compaction(tiny_random_model):
    method = Composed([StreamingLLM(sinks=4, window=24), Quest(budget=8, page_size=4, skip_layers=0)])
    _, _, session = greedy(Engine(tiny_random_model, method), [prompt(40, 3)], 12)
    for layer, state in enumerate(session.states):
        lc, sub = session.cache[layer], state["part1"]
        assert sub["quest_version"] == lc.version > 0
        kmin, kmax = page_minmax(lc.keys(), lc.lengths, 4)
        assert torch.equal(sub["quest_kmin"], kmin) and torch.equal(sub["quest_kmax"], kmax)


def test_selection_reads_less_but_keeps_the_cache(tiny_random_model):
    p = [prompt(60, 4)]
    _, _, dense = greedy(Engine(tiny_random_model, "dense"), p, 8)
    res = Engine(tiny_random_model, Quest(budget=16, page_size=4)).generate(p, 8, stop_tokens=[])
    reads = res.stats.read_per_layer
    assert reads[0] == reads[1] > reads[2]  # layers 0-1 dense, layer 2 reads <= 16 tokens
    assert reads[2] <= 16
    _, _, sess = greedy(Engine(tiny_random_model, Quest(budget=16, page_size=4)), p, 8)
    for layer in range(tiny_random_model.config.num_hidden_layers):
        assert torch.equal(sess.cache[layer].lengths, dense.cache[layer].lengths)
        torch.testing.assert_close(sess.cache[layer].k[:, :, :60], dense.cache[layer].k[:, :, :60])


def test_ragged_batch_matches_single_runs(tiny_random_model):
    prompts = [prompt(37, 5), prompt(53, 6)]
    engine = Engine(tiny_random_model, Quest(budget=12, page_size=4, skip_layers=0))
    t_b, l_b, _ = greedy(engine, prompts, 10)
    for i, pr in enumerate(prompts):
        t_s, l_s, _ = greedy(engine, [pr], 10)
        assert torch.equal(t_b[i], t_s[0])
        torch.testing.assert_close(l_b[:, i], l_s[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("evictor", ["snapkv", "streamingllm"])
def test_composition_reads_product_of_fractions(tiny_random_model, evictor):
    try:
        evict = get_method(evictor, budget=0.5)
    except UnknownMethodError:
        pytest.skip(f"{evictor} is not registered yet")
    n, steps = 96, 6
    res = Engine(tiny_random_model, Composed([evict, Quest(budget=0.5, page_size=4)])).generate(
        [prompt(n, 7)], steps, stop_tokens=[]
    )
    kept = res.stats.kept_per_layer[2]
    assert kept == pytest.approx(0.5 * (n + steps - 1), abs=steps + 1)
    # Quest reads K = (0.5 * kept) // 4 pages of what the evictor kept, the last one possibly partial
    assert 0.25 * n - 2 * 4 <= res.stats.read_per_layer[2] <= 0.25 * (n + steps)
    assert res.stats.read_per_layer[0] == pytest.approx(kept, abs=steps)  # skipped layer reads all kept


# ---------------------------------------------------------------------------- lean uniform path
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget", [4, 9, 0.3, [5, 6, 7, 12]])
@pytest.mark.parametrize(("reduce", "sink"), [("max", False), ("mean", True), ("sum", False)])
def test_uniform_path_equals_general_path(seed, budget, reduce, sink):
    n = [37, 40, 64][seed]
    ctx = make_ctx([[n, n], [n, n]], seed=seed)
    m = Quest(budget=budget, page_size=4, skip_layers=0, group_reduce=reduce, sink_page=sink)
    fast = m._select_uniform(ctx, n)
    ctx.state.clear()
    slow = m._select_general(ctx)
    assert (fast is None) == (slow is None)
    if fast is not None and slow is not None:
        assert torch.equal(fast.index, slow.index) and torch.equal(fast.valid, slow.valid)


def test_bounds_are_updated_in_place(tiny_random_model):
    engine = Engine(tiny_random_model, Quest(budget=8, page_size=4, skip_layers=0))
    session = engine.prefill([prompt(30, 5)])
    engine.decode(session, torch.tensor([1]))  # builds the bounds (with spare pages)
    ptrs = [{st["quest_kmin"].data_ptr()} for st in session.states]
    for t in range(12):
        engine.decode(session, torch.tensor([t]))
        for seen, st in zip(ptrs, session.states, strict=True):
            seen.add(st["quest_kmin"].data_ptr())
    assert all(len(seen) <= 2 for seen in ptrs)  # one growth by a chunk of pages, no per-step copy
    for layer, st in enumerate(session.states):
        lc = session.cache[layer]
        kmin, kmax = page_minmax(lc.keys(), lc.lengths, 4)
        n = kmin.shape[2]
        assert torch.equal(st["quest_kmin"][:, :, :n], kmin) and torch.equal(st["quest_kmax"][:, :, :n], kmax)


def test_topk_ascending_equals_select_topk_with_ties():
    from mpckv.plaintext.methods.topk import select_topk, topk_ascending

    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(2, 40, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        scores = torch.randint(0, 4 if trial % 2 else 1000, (2, 3, n), generator=gen).float()  # many ties
        scores[..., -1] = float("inf")
        idx, valid = select_topk(scores, k)
        assert valid.all() and torch.equal(topk_ascending(scores, k), idx)
