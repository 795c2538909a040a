"""MPCache (Zeng et al., arXiv 2501.06807): oracles of the spec card (shared/methods/mpcache.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods import clusters as clusters_module
from mpckv.plaintext.methods import mpcache as mpcache_module
from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
from mpckv.plaintext.methods.clusters import (
    children_mask,
    cluster_boxes,
    clusters_to_tokens,
    hierarchical_select,
    num_clusters,
    proxy_scores,
    proxy_vectors,
)
from mpckv.plaintext.methods.mpcache import MPCache, static_keep_counts, static_scores, static_window_sizes
from mpckv.plaintext.model import LayerWeights, LlamaModel
from mpckv.registry import get_method

V, D, HD = 64, 32, 8


def make_model(layers: int = 6, seed: int = 0) -> LlamaModel:
    """A random Llama (GQA 4/2, head_dim 8) built in code."""
    cfg = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=HD)  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    lw = [
        LayerWeights(
            1 + w(D, std=0.1),
            w(D, D),
            w(16, D),
            w(16, D),
            w(D, D),
            1 + w(D, std=0.1),
            w(48, D),
            w(48, D),
            w(D, 48),
        )  # fmt: skip
        for _ in range(layers)
    ]
    return LlamaModel(cfg, w(V, D, std=1.0), lw, torch.ones(D), w(V, D, std=1.0))


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return make_model()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(engine: Engine, prompts: list[list[int]], steps: int):
    session = engine.prefill(prompts)
    toks, logits = [], []
    for _ in range(steps):
        logits.append(session.logits.clone())
        toks.append(session.logits.argmax(-1))
        engine.decode(session, toks[-1])
    return torch.stack(toks, 1), torch.stack(logits), session


def cfg(layers: int = 4) -> ModelConfig:
    return ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=HD)  # fmt: skip


def decode_ctx(
    lengths: list[list[int]], seed: int = 0, keys: torch.Tensor | None = None, position: int | None = None
) -> DecodeContext:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    b, hk = lens.shape
    t = int(lens.max())
    cache = LayerCache(b, hk, HD, torch.float32, torch.device("cpu"))
    k = torch.randn(b, hk, t, HD, generator=gen) if keys is None else keys
    cache.append(k, torch.randn(b, hk, t, HD, generator=gen), torch.arange(t).expand(b, t))
    cache.lengths = lens.clone()
    q = torch.randn(b, 4, HD, generator=gen)
    pos = lens.max(-1).values if position is None else torch.full((b,), position)
    return DecodeContext(2, cfg(), cache, q, pos, 0, HD**-0.5, {})


def test_ratio_budget_counts_the_tokens_seen_before_static_eviction():
    """A ratio budget is a fraction of the sequence seen so far (paper: kept fraction × ρ2 of the full
    context), not of the statically compacted cache: 20 % of 80 seen tokens is 16 tokens = 4 clusters of
    4, where 20 % of the 40 kept entries would give only 2."""
    m = MPCache(budget=0.2, cluster_sizes=(8, 4), level_ratios=0.5)
    levels = m.select_clusters(decode_ctx([[40, 40]], position=79))
    assert levels is not None
    assert levels[-1][1].sum(-1).tolist() == [[4, 4]]
    levels = m.select_clusters(decode_ctx([[40, 40]], position=39))
    assert levels is not None
    assert levels[-1][1].sum(-1).tolist() == [[2, 2]]
    assert m.select_clusters(decode_ctx([[40, 40]], position=400)) is None  # 80 tokens >= 40 kept: dense


def prefill_ctx(lengths: list[int], seed: int = 0) -> PrefillContext:
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    q, k = torch.randn(b, 4, t, HD, generator=gen) * 2, torch.randn(b, 2, t, HD, generator=gen) * 2
    cache = LayerCache(b, 2, HD, torch.float32, torch.device("cpu"))
    cache.append(
        k, torch.randn(b, 2, t, HD, generator=gen), torch.arange(t).expand(b, t), torch.tensor(lengths)
    )
    return PrefillContext(2, cfg(), cache, q, torch.tensor(lengths), HD**-0.5, {}, torch.ones(HD // 2), [])


# ---------------------------------------------------------------------------- configuration
def test_registered_with_defaults():
    m = get_method("mpcache")
    assert isinstance(m, MPCache) and (m.family, m.secure) == ("selection", "yes")
    assert "2501.06807" in m.paper and str(m.resolved_budget) == "0.1"
    assert (m.static_ratio, m.cluster_sizes, m.level_ratios, m.alpha) == (0.5, (32, 16), (0.5,), 0.6)
    assert m.dense_layers == (0, 1) and m.share_groups(8) == [(2, 3), (4, 5), (6, 7)]
    assert MPCache(dense_layers=[0, 1, 2]).share_groups(7) == [(4, 5)]
    assert MPCache(share=[[5, 3, 4]]).leader_of(5, 6) == 3 and MPCache(share="none").share_groups(8) == []


@pytest.mark.parametrize(
    "bad",
    [{"static_ratio": 0.0}, {"alpha": 1.5}, {"cluster_sizes": (16, 12)}, {"cluster_sizes": (8, 8)},
     {"cluster_sizes": ()}, {"level_ratios": (0.5, 0.5)}, {"level_ratios": 0.0}, {"static_mode": "x"},
     {"group_reduce": "min"}, {"share": [[2, 3], [3, 4]]}, {"share": [[1, 2]]}, {"share": "all"},
     {"sinks": -1}, {"window_frac": 2.0}, {"topk_network": "odd-even"}],
)  # fmt: skip
def test_bad_parameters(bad):
    with pytest.raises(ConfigError):
        MPCache(**bad)


def test_share_groups_beyond_the_model_are_rejected(model):
    with pytest.raises(ConfigError):
        Engine(model, MPCache(share=[[4, 7]]))


# ---------------------------------------------------------------------------- boxes and proxy
def test_box_invariants_and_partial_cluster():
    k = torch.randn(2, 2, 21, HD)
    lengths = torch.tensor([[21, 13], [7, 1]])
    rmin, rmax = cluster_boxes(k, lengths, 4)
    for b in range(2):
        for h in range(2):
            n = int(lengths[b, h])
            for t in range(n):
                assert (rmin[b, h, t // 4] <= k[b, h, t]).all() and (k[b, h, t] <= rmax[b, h, t // 4]).all()
            last = (n - 1) // 4  # box of the partial last cluster covers only its real tokens (no overlap)
            torch.testing.assert_close(rmax[b, h, last], k[b, h, last * 4 : n].amax(0), rtol=0, atol=0)
            torch.testing.assert_close(rmin[b, h, last], k[b, h, last * 4 : n].amin(0), rtol=0, atol=0)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_proxy_score_is_q_dot_alpha_max_plus_rest_min(reduce):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, HD, generator=gen), torch.randn(2, 2, 30, HD, generator=gen)
    lengths = torch.tensor([[30, 17], [9, 30]])
    rmin, rmax = cluster_boxes(k, lengths, 8)
    nv = num_clusters(lengths, 8)
    for alpha in (0.6, 1.0):
        u = proxy_scores(q, proxy_vectors(rmin, rmax, alpha), nv, reduce)
        for b in range(2):
            for h in range(2):
                for c in range(4):
                    if c >= nv[b, h]:
                        assert u[b, h, c] == float("-inf")
                        continue
                    per = [
                        q[b, g] @ (alpha * rmax[b, h, c] + (1 - alpha) * rmin[b, h, c])
                        for g in (2 * h, 2 * h + 1)
                    ]
                    want = max(per) if reduce == "max" else sum(per) / 2
                    assert u[b, h, c] == pytest.approx(float(want), abs=1e-5)


def test_incremental_boxes_match_recompute(model, monkeypatch):
    calls = []
    real = clusters_module.page_minmax
    monkeypatch.setattr(clusters_module, "page_minmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m = MPCache(budget=8, cluster_sizes=(8, 4), share="none", static_ratio=0.6)
    _, _, session = greedy(Engine(model, m), [prompt(41, 1), prompt(26, 2)], 26)
    assert len(calls) == 4 * 2  # layers 2..5, two levels: built once, then updated for 26 steps
    for layer in range(2, 6):
        lc, st = session.cache[layer], session.states[layer]
        for lvl, size in enumerate((8, 4)):
            rmin, rmax = cluster_boxes(lc.keys(), lc.lengths, size)
            n = rmin.shape[2]
            assert torch.equal(st[f"mpcache_box{lvl}_min"][:, :, :n], rmin)
            assert torch.equal(st[f"mpcache_box{lvl}_max"][:, :, :n], rmax)


# ---------------------------------------------------------------------------- hierarchical selection
def naive_topk(scores: list[float], k: int, forced: set[int], allowed: set[int]) -> list[int]:
    rest = sorted((c for c in allowed if c not in forced), key=lambda c: (-scores[c], c))
    return sorted(forced | set(rest[: max(0, k - len(forced))]))


def test_hierarchical_select_matches_naive():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([[61, 40], [17, 64]])
    sizes = (16, 8, 4)
    nv = [num_clusters(lengths, s) for s in sizes]
    scores = [torch.randn(2, 2, 16 // (s // 4), generator=gen) for s in sizes]
    ks = [torch.tensor([[3, 2], [2, 3]]), torch.tensor([[4, 3], [2, 5]]), torch.tensor([[5, 4], [3, 6]])]
    levels = hierarchical_select(scores, ks, nv, sizes)
    for b in range(2):
        for h in range(2):
            allowed = None
            for lvl in range(3):
                n = int(nv[lvl][b, h])
                cand = set(range(n)) if allowed is None else {c for c in allowed if c < n}
                want = naive_topk(scores[lvl][b, h].tolist(), int(ks[lvl][b, h]), {0, n - 1}, cand)
                idx, val = levels[lvl]
                assert idx[b, h][val[b, h]].tolist() == want
                allowed = {c * 2 + j for c in want for j in (0, 1)}


def test_children_mask_and_token_expansion():
    pidx, pval = torch.tensor([[[0, 2, 0]]]), torch.tensor([[[True, True, False]]])
    assert children_mask(pidx, pval, 7, 2)[0, 0].tolist() == [True, True, False, False, True, True, False]
    idx, val = clusters_to_tokens(
        torch.tensor([[[0, 3, 0]]]), torch.tensor([[[True, True, False]]]), 4, torch.tensor([[14]])
    )
    assert idx[0, 0][val[0, 0]].tolist() == [0, 1, 2, 3, 12, 13] and val.shape[-1] == 6


def expected_counts(n: int, tokens: int, sizes: tuple[int, ...], ratio: float) -> list[int]:
    """The count rule, written independently: last level from the budget, upper levels from the ratio,
    raised to the fewest parents (forced last one + full ones) whose children hold the picks below."""
    cs = [math.ceil(n / s) for s in sizes]
    out = [cs[-1] if tokens >= n else min(cs[-1], max(2, tokens // sizes[-1]))]
    for lvl in range(len(sizes) - 2, -1, -1):
        r = sizes[lvl] // sizes[lvl + 1]
        m = 1
        while (m - 1) * r + (cs[lvl + 1] - (cs[lvl] - 1) * r) < out[0]:
            m += 1
        out.insert(0, min(cs[lvl], max(2, math.floor(ratio * cs[lvl]), m)))
    return out


@pytest.mark.parametrize("sizes", [(8, 4), (16, 8, 4), (32, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_selection_sizes_forced_and_nested(sizes, seed):
    lengths = torch.randint(20, 140, (2, 2), generator=torch.Generator().manual_seed(seed)).tolist()
    m = MPCache(budget=0.15, cluster_sizes=sizes, level_ratios=0.5)
    runs = [m.select_clusters(decode_ctx(lengths, seed=s)) for s in (seed, seed + 100)]
    sel = m.select(decode_ctx(lengths, seed=seed))
    assert runs[0] is not None and runs[1] is not None and sel is not None
    for lvl in range(len(sizes)):  # sizes are public: equal for two different caches of equal lengths
        assert torch.equal(runs[0][lvl][1].sum(-1), runs[1][lvl][1].sum(-1))
    for b, row in enumerate(lengths):
        seen = max(row) + 1  # decode_ctx's position + 1: the ratio's base (never below the row's length)
        for h, n in enumerate(row):
            tokens = m.resolved_budget.tokens_for(max(n, seen))
            assert [int(v[b, h].sum()) for _, v in runs[0]] == expected_counts(n, tokens, sizes, 0.5)
            parents = None
            for lvl, (idx, val) in enumerate(runs[0]):
                picked = idx[b, h][val[b, h]].tolist()
                last = math.ceil(n / sizes[lvl]) - 1
                assert picked == sorted(set(picked)) and 0 in picked and last in picked
                if parents is not None:
                    r = sizes[lvl - 1] // sizes[lvl]
                    assert {c // r for c in picked} <= set(parents)
                parents = picked
            toks = sel.index[b, h][sel.valid[b, h]].tolist()
            assert toks == sorted(set(toks)) and max(toks) == n - 1 and max(toks) < n
            assert len(toks) <= sizes[-1] * len(parents)


def test_large_budget_raises_upper_levels():
    m = MPCache(budget=60, cluster_sizes=(16, 4), level_ratios=0.1)
    levels = m.select_clusters(decode_ctx([[130, 97]]))
    assert levels is not None
    assert levels[-1][1].sum(-1).tolist() == [[15, 15]]  # 60 // 4 picks fit under the raised level-1 picks


def test_ties_go_to_the_lower_index():
    ctx = decode_ctx([[64, 50]], keys=torch.ones(1, 2, 64, HD))
    levels = MPCache(budget=12, cluster_sizes=(8, 4), level_ratios=0.5).select_clusters(ctx)
    assert levels is not None
    (i1, v1), (i2, v2) = levels
    assert i1[0, 0][v1[0, 0]].tolist() == [0, 1, 2, 7] and i1[0, 1][v1[0, 1]].tolist() == [0, 1, 6]
    assert i2[0, 0][v2[0, 0]].tolist() == [0, 1, 15] and i2[0, 1][v2[0, 1]].tolist() == [0, 1, 12]


# ---------------------------------------------------------------------------- static eviction
def test_static_scores_match_naive():
    ctx = prefill_ctx([23, 15], seed=4)
    n0 = ctx.prompt_lengths
    w = static_window_sizes(n0, 0.2)
    assert w.tolist() == [4, 3]
    for mode in ("layer", "head"):
        got = static_scores(ctx.q, ctx.cache.keys(), n0, w, ctx.scale, mode)
        for b, n in enumerate(n0.tolist()):
            per_head = torch.zeros(4, n)
            for hq in range(4):
                for i in range(n - int(w[b]), n):
                    s = (ctx.cache.k[b, hq // 2, : i + 1] @ ctx.q[b, hq, i]) * ctx.scale
                    per_head[hq, : i + 1] += torch.softmax(s, -1)
            want = per_head.mean(0).expand(2, n) if mode == "layer" else per_head.view(2, 2, n).mean(1)
            torch.testing.assert_close(got[b, :, :n], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["layer", "head"])
def test_static_keeps_forced_plus_top_votes(mode):
    ctx = prefill_ctx([40, 27], seed=5)
    n0 = ctx.prompt_lengths
    w = static_window_sizes(n0, 0.2)
    votes = static_scores(ctx.q, ctx.cache.keys(), n0, w, ctx.scale, mode)
    MPCache(static_ratio=0.4, static_mode=mode).on_prefill(ctx)
    for b, n in enumerate(n0.tolist()):
        keep = math.ceil(0.4 * n)
        forced = set(range(4)) | set(range(n - int(w[b]), n))
        for h in range(2):
            want = naive_topk(votes[b, h].tolist(), keep, forced, set(range(n)))
            assert ctx.cache.pos[b, h, : int(ctx.cache.lengths[b, h])].tolist() == want
        if mode == "layer":
            assert torch.equal(ctx.cache.pos[b, 0], ctx.cache.pos[b, 1])


def test_static_counts_are_public(model):
    n0 = torch.tensor([100, 10, 7])
    w = static_window_sizes(n0, 0.2)
    assert static_keep_counts(n0, 0.5, 4, w).tolist() == [50, 6, 5]  # forced sinks ∪ window can exceed
    m = MPCache(static_ratio=0.3, cluster_sizes=(8, 4))
    kept = [Engine(model, m).prefill([prompt(57, s)]).cache.mean_lengths() for s in (7, 8)]
    assert kept[0] == kept[1] == [57.0, 57.0] + [float(math.ceil(0.3 * 57))] * 4


def test_generated_tokens_never_statically_evicted(model):
    m = MPCache(budget=6, static_ratio=0.4, cluster_sizes=(8, 4), static_mode="head")
    engine = Engine(model, m)
    session = engine.prefill([prompt(50, 9), prompt(33, 10)])
    after_prefill = [lc.positions().clone() for lc in session.cache.layers]
    for _ in range(12):
        engine.decode(session, session.logits.argmax(-1))
    for layer, lc in enumerate(session.cache.layers):
        for b, n0 in enumerate((50, 33)):
            for h in range(2):
                k0 = int(session.states[layer].get("mpcache_static_kept", lc.lengths - 12)[b, h])
                pos = lc.pos[b, h, : int(lc.lengths[b, h])].tolist()
                assert pos[:k0] == after_prefill[layer][b, h, :k0].tolist()  # static set never changes
                assert pos[k0:] == list(range(n0, n0 + 12))  # every generated token is still there


# ---------------------------------------------------------------------------- engine oracles
@pytest.mark.parametrize("budget", [10_000, 1.0])
@pytest.mark.parametrize("dense_layers", [(0, 1), ()])
def test_full_budget_is_dense(model, budget, dense_layers):
    p = [prompt(45, 0), prompt(30, 11)]
    t_d, l_d, _ = greedy(Engine(model, "dense"), p, 8)
    m = MPCache(budget=budget, static_ratio=1.0, cluster_sizes=(8, 4), dense_layers=dense_layers)
    t_m, l_m, _ = greedy(Engine(model, m), p, 8)
    assert torch.equal(t_d, t_m) and torch.equal(l_d, l_m)


def test_shared_layers_reuse_the_leader_selection(model, monkeypatch):
    calls: list[int] = []
    returned: dict[int, object] = {}
    real_sc, real_sel = MPCache.select_clusters, MPCache.select
    monkeypatch.setattr(
        MPCache, "select_clusters", lambda self, ctx: calls.append(ctx.layer) or real_sc(self, ctx)
    )

    def spy(self, ctx):
        returned[ctx.layer] = out = real_sel(self, ctx)
        return out

    monkeypatch.setattr(MPCache, "select", spy)
    m = MPCache(budget=8, cluster_sizes=(8, 4), static_ratio=0.7)
    engine = Engine(model, m)
    session = engine.prefill([prompt(60, 12), prompt(44, 13)])
    for step in range(5):
        engine.decode(session, session.logits.argmax(-1))
        assert calls[2 * step :] == [2, 4]  # followers 3 and 5 compute nothing
        assert returned[3] is returned[2] and returned[5] is returned[4] and returned[2] is not None
        assert returned[0] is None and returned[1] is None
    assert not any(k.startswith("mpcache_box") for k in session.states[3])
    assert session.read_sums[3] == session.read_sums[2] and session.read_sums[5] == session.read_sums[4]


def test_static_sharing_and_explicit_groups(model):
    m = MPCache(budget=8, cluster_sizes=(8, 4), static_ratio=0.5, share=[[2, 4, 5]], share_static=True)
    _, _, session = greedy(Engine(model, m), [prompt(52, 14)], 4)
    for layer in (4, 5):
        assert torch.equal(session.cache[layer].positions(), session.cache[2].positions())
    assert not torch.equal(session.cache[3].positions(), session.cache[2].positions())


def test_ragged_batch_matches_single_runs(model):
    prompts = [prompt(37, 15), prompt(61, 16)]
    engine = Engine(model, MPCache(budget=0.3, cluster_sizes=(8, 4), static_ratio=0.6, dense_layers=(0,)))
    t_b, l_b, _ = greedy(engine, prompts, 10)
    for i, pr in enumerate(prompts):
        t_s, l_s, _ = greedy(engine, [pr], 10)
        assert torch.equal(t_b[i], t_s[0])
        torch.testing.assert_close(l_b[:, i], l_s[:, 0], atol=1e-4, rtol=1e-4)


def test_selection_reads_the_budget(model):
    res = Engine(model, MPCache(budget=8, cluster_sizes=(8, 4), static_ratio=0.5)).generate(
        [prompt(90, 17)], 6, stop_tokens=[]
    )
    kept, read = res.stats.kept_per_layer, res.stats.read_per_layer
    assert kept[:2] == [95.0, 95.0] and kept[2:] == [50.0] * 4
    assert read[0] == read[1] > read[2] and all(r <= 8 for r in read[2:])


# ---------------------------------------------------------------------------- lean uniform path
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget", [8, 20, 0.3, 0.1])
@pytest.mark.parametrize(("sizes", "reduce"), [((8, 4), "mean"), ((16, 8, 4), "max"), ((8, 2), "sum")])
def test_uniform_path_equals_general_path(seed, budget, sizes, reduce):
    n = [61, 64, 97][seed]
    m = MPCache(budget=budget, cluster_sizes=sizes, group_reduce=reduce, share="none")
    ctx = decode_ctx([[n, n], [n, n]], seed=seed, position=n + 5)
    levels, sel = m._select_uniform(ctx, n, n + 6)
    ctx.state.clear()
    ref = m.select_clusters(ctx)
    assert (levels is None) == (ref is None)
    if levels is None or ref is None:
        return
    for (i, v), (ri, rv) in zip(levels, ref, strict=True):
        assert torch.equal(i, ri[..., : i.shape[-1]]) and bool(rv.all()) and i.shape == ri.shape and v.all()
    idx, valid = clusters_to_tokens(*ref[-1], sizes[-1], ctx.cache.lengths)
    assert sel is not None and torch.equal(sel.index, idx) and torch.equal(sel.valid, valid)


def test_engine_uniform_path_matches_general_path(model, monkeypatch):
    """Whole generations: the lean path gives the tokens and logits of the general path."""
    m = MPCache(budget=0.3, cluster_sizes=(8, 4), share="pairs", static_ratio=0.6)
    p = [prompt(70, 9)]
    t_fast, l_fast, s_fast = greedy(Engine(model, m), p, 20)
    monkeypatch.setattr(mpcache_module, "_uniform", lambda x: None)
    t_slow, l_slow, _ = greedy(Engine(model, m), p, 20)
    assert torch.equal(t_fast, t_slow)
    torch.testing.assert_close(l_fast, l_slow, atol=1e-6, rtol=1e-6)
    for layer in (2, 4):  # the leaders: their in-place proxies equal a recompute from the boxes
        st, lc = s_fast.states[layer], s_fast.cache[layer]
        for lvl, size in enumerate((8, 4)):
            rmin, rmax = cluster_boxes(lc.keys(), lc.lengths, size)
            c = rmin.shape[2]
            assert torch.equal(st[f"mpcache_box{lvl}_proxy"][:, :, :c], proxy_vectors(rmin, rmax, m.alpha))
