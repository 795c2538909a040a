"""MPCache under MPC (protocols/mpcache_secure.py): secret indices, plaintext parity, in real parties.

* **Selection parity** (hypothesis): for random keys and queries whose boundary score gaps (between the
  last picked and the best unpicked candidate, per level) exceed ``TOL`` — far above the fixed-point
  error of the proxy scores (a few ``2**-16`` steps times ``‖q‖₁``) — the secure hierarchical selection
  picks exactly the plaintext clusters at every level, also over appended steps (incremental boxes).
* **One-hot gather = indexing**: the Selection's oblivious gather returns exactly ``K[idx], V[idx]`` of the
  plaintext token indices, on the stock and the persistent-mask cache.
* **Static eviction parity**: the secret window mass equals the plaintext one (times the number of heads:
  the secure side sums instead of averaging) within ``STATIC_TOL``; leaky and oblivious compaction keep
  the plaintext rows (bit-exact K), oblivious mode reveals nothing, leaky mode reveals exactly one
  ``[1, 1, b − a]`` bit vector to everyone.
* **Sharing**: a follower layer returns its leader's selection and spends zero bytes while selecting.
* **Generation**: secure greedy generation with MPCache equals plaintext token for token on a random
  4-layer tiny llama (vocab 48, head_dim 8, prompt 64, cluster sizes (8, 4)), for stock and persistent
  caches, oblivious and leaky compaction; kept and read sizes equal the plaintext ones; the follower
  layer (3) spends zero selection bytes; the reveals are the output tokens (plus the leaky kept sets).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import mpckv
from mpckv.config import ModelConfig
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
from mpckv.plaintext.methods.clusters import (
    cluster_boxes,
    num_clusters,
    proxy_scores,
    proxy_vectors,
    static_forced,
    static_keep_counts,
    static_scores,
    static_window_sizes,
)
from mpckv.plaintext.methods.mpcache import MPCache
from mpckv.plaintext.methods.topk import select_topk, topk_ascending
from mpckv.plaintext.model import LlamaModel
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.testing import (
    assert_check_passed,
    party_settings,
    register_checks,
    run_parties,
)
from mpckv.random_model import random_llama

pytestmark = pytest.mark.mpc

LSB = 2.0**-16
TOL = 2e-3  # boundary gap required of the plaintext proxy scores (≫ fixed-point error)
STATIC_TOL = 1e-3  # measured secure window-mass error bound, in plaintext (mean over heads) units
VOCAB, NEW, PROMPT_LEN = 48, 4, 64
PARAMS: dict[str, Any] = dict(budget=16, cluster_sizes=(8, 4), static_ratio=0.5, sinks=4, level_ratios=0.5)


# =========================================================================================== helpers
def _cfg(layers: int, h: int = 4, hk: int = 2, d: int = 8) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=h,
        num_key_value_heads=hk,
        head_dim=d,
        rms_norm_eps=1e-5,
    )


def _tiny_model(seed: int = 0, layers: int = 4) -> LlamaModel:
    return random_llama(_cfg(layers), seed=seed)


def _quant(x: torch.Tensor) -> torch.Tensor:
    """Round to the fixed-point grid, so plaintext and secure start from the same inputs."""
    return torch.round(x * 2**16) / 2**16


def boundary_gap(
    scores: torch.Tensor, k: Any, forced: torch.Tensor | None = None, invalid: torch.Tensor | None = None
) -> float:
    """Smallest gap, over rows, between the last picked and the best unpicked free entry of
    :func:`select_topk` (``inf`` when a row picks none or all of its free entries)."""
    s = scores.float().reshape(-1, scores.shape[-1])
    inv = (invalid if invalid is not None else torch.zeros_like(scores, dtype=torch.bool)).reshape(s.shape)
    frc = (forced if forced is not None else torch.zeros_like(scores, dtype=torch.bool)).reshape(s.shape)
    frc = frc & ~inv
    kk = torch.as_tensor(k).expand(scores.shape[:-1]).reshape(-1)
    kk = torch.maximum(kk, frc.sum(-1)).minimum((~inv).sum(-1))
    out = float("inf")
    for r in range(s.shape[0]):
        vals = torch.sort(s[r][~(frc[r] | inv[r])], descending=True).values
        m = int(kk[r]) - int(frc[r].sum())
        if 0 < m < vals.numel():
            out = min(out, float(vals[m - 1] - vals[m]))
    return out


@contextlib.contextmanager
def recording_gaps():
    """Record the boundary gap of every plaintext MPCache top-k (static and hierarchical)."""
    import mpckv.plaintext.methods.clusters as cl
    import mpckv.plaintext.methods.mpcache as mm

    rec: dict[str, list[float]] = {"static": [], "select": []}

    def wrap(kind: str) -> Any:
        def topk(scores: torch.Tensor, k: Any, forced: Any = None, invalid: Any = None) -> Any:
            rec[kind].append(boundary_gap(scores, k, forced, invalid))
            return select_topk(scores, k, forced=forced, invalid=invalid)

        return topk

    def ascending(scores: torch.Tensor, k: int) -> Any:  # the uniform-length fast path of the selection
        rec["select"].append(boundary_gap(scores, k, torch.isposinf(scores), torch.isneginf(scores)))
        return topk_ascending(scores, k)

    old = mm.select_topk, cl.select_topk, mm.topk_ascending
    mm.select_topk, cl.select_topk, mm.topk_ascending = wrap("static"), wrap("select"), ascending
    try:
        yield rec
    finally:
        mm.select_topk, cl.select_topk, mm.topk_ascending = old


def _reveal(x: Any) -> torch.Tensor:
    with comm.paused():
        return x.get_plain_text().double()


def _bits(x: Any) -> torch.Tensor:
    """Selected-cluster bits as a plain tensor (revealed when secret, for the test only)."""
    from mpckv.protocols.primitives import is_secret

    return _reveal(x).round().long() if is_secret(x) else x.long()


def _share(x: torch.Tensor) -> Any:
    with comm.paused():
        return import_crypten().cryptensor(x)


def _plain_ctx(method: MPCache, cache: LayerCache, q: torch.Tensor, layer: int, cfg: ModelConfig) -> Any:
    return DecodeContext(layer, cfg, cache, q, torch.zeros(1, dtype=torch.long), 0, 1.0, {}, [], None)


def _level_sets(levels: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[set[int]]]:
    return [[set(i[v].tolist()) for i, v in zip(index[0], valid[0], strict=True)] for index, valid in levels]


# ====================================================================================== party checks
def check_selection_and_gather_parity() -> None:
    """Hypothesis: secure picks == plaintext picks per level (gaps > TOL), gather == indexing."""
    from mpckv.protocols import mpcache_secure as ms
    from mpckv.protocols.persistent_cache import PersistentLayerCache
    from mpckv.protocols.secure_cache import SecureLayerCache

    comm.install()
    checked: list[int] = []
    secret_final: list[bool] = []
    compacted: list[int] = []  # calls of the compacted-candidates path (secret previous picks)
    networks: set[str] = set()  # top-k networks that reached a checked selection
    real_candidates = ms._child_candidates

    def counting_candidates(*args: Any) -> Any:
        compacted.append(1)
        return real_candidates(*args)

    ms._child_candidates = counting_candidates  # type: ignore[assignment]

    @party_settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**16),
        n=st.integers(18, 40),
        hk=st.sampled_from([1, 2]),
        g=st.sampled_from([1, 2]),
        sizes=st.sampled_from([(8, 4), (4, 2), (8, 4, 2)]),
        budget=st.integers(6, 16),
        ratio=st.sampled_from([0.5, 0.75]),
        reduce=st.sampled_from(["mean", "max"]),
        steps=st.integers(1, 3),
        network=st.sampled_from(["bitonic", "rank"]),
    )
    def prop(seed, n, hk, g, sizes, budget, ratio, reduce, steps, network):
        d = 8
        cfg = _cfg(1, h=hk * g, hk=hk, d=d)
        gen = torch.Generator().manual_seed(seed)
        method = MPCache(
            budget=budget,
            cluster_sizes=sizes,
            level_ratios=ratio,
            group_reduce=reduce,
            dense_layers=(),
            share="none",
            topk_network=network,
        )
        total = n + steps
        K = _quant(torch.randn(1, hk, total, d, generator=gen))
        V = _quant(torch.randn(1, hk, total, d, generator=gen))
        Q = _quant(torch.randn(steps, 1, hk * g, d, generator=gen))
        plain = LayerCache(1, hk, d, torch.float32, torch.device("cpu"))
        plain.append(K[:, :, :n], V[:, :, :n], torch.arange(n)[None])
        caches = [SecureLayerCache(1, hk, d), PersistentLayerCache(1, hk, d)]
        sk, sv = _share(K), _share(V)
        for c in caches:
            c.append(sk[:, :, :n], sv[:, :, :n], torch.arange(n)[None])
        states: list[dict] = [{}, {}]
        for step in range(steps):
            m = n + step + 1
            plain.append(K[:, :, m - 1 : m], V[:, :, m - 1 : m], torch.tensor([[m - 1]]))
            for c in caches:
                c.append(sk[:, :, m - 1 : m], sv[:, :, m - 1 : m], torch.tensor([[m - 1]]))
            ctx = _plain_ctx(method, plain, Q[step], 0, cfg)
            levels = method.select_clusters(ctx)
            if levels is None:
                continue
            # boundary gaps of the plaintext selection, level by level
            ks = method.level_sizes(plain.lengths, 0)
            prev = None
            for lvl, s in enumerate(sizes):
                nv = num_clusters(plain.lengths, s)
                rmin, rmax = cluster_boxes(plain.keys(), plain.lengths, s)
                u = proxy_scores(Q[step], proxy_vectors(rmin, rmax, method.alpha), nv, reduce)
                col = torch.arange(u.shape[-1])
                invalid = col >= nv[..., None]
                if prev is not None:
                    from mpckv.plaintext.methods.clusters import children_mask

                    invalid = invalid | ~children_mask(*prev, u.shape[-1], sizes[lvl - 1] // s)
                forced = ((col == 0) | (col == (nv - 1)[..., None])) & ~invalid
                assume(boundary_gap(u, ks[lvl], forced, invalid) > TOL)
                prev = levels[lvl]
            want = _level_sets(levels)
            idx = method.select(ctx).index  # token indices of the plaintext Selection
            for cache, state in zip(caches, states, strict=True):
                sctx = DecodeContext(
                    0,
                    cfg,
                    cache,
                    _share(Q[step]),
                    torch.zeros(1, dtype=torch.long),
                    step,
                    1.0,
                    state,
                    [],
                    None,
                )
                choice = ms.select_clusters(method, sctx)
                assert choice is not None
                got = [
                    [set(torch.nonzero(_bits(lv.bits)[0, h]).flatten().tolist()) for h in range(hk)]
                    for lv in choice.levels
                ]
                assert got == want, (got, want)
                k_rows, v_rows, lengths, keep = ms.gather_clusters(cache, choice)
                assert keep is None and int(lengths[0, 0]) == idx.shape[-1] == choice.rows
                gi = idx[..., None].expand(1, hk, idx.shape[-1], d)
                assert torch.equal(_reveal(k_rows), plain.keys().double().gather(2, gi))
                assert torch.equal(_reveal(v_rows), plain.values().double().gather(2, gi))
                secret_final.append(ms.is_secret(choice.final.onehot))
            checked.append(step)
            networks.add(network)

    try:
        prop()
    finally:
        ms._child_candidates = real_candidates  # type: ignore[assignment]
    assert checked, "no example reached a non-dense selection with clear gaps"
    assert any(secret_final), "no example chose its final clusters by a secret top-k"
    assert compacted, "no example ran a lower level over the compacted children of secret picks"
    assert networks == {"bitonic", "rank"}, f"only {networks} reached a checked selection"


def check_static_eviction_parity() -> None:
    """Secret window mass ≈ plaintext; leaky / oblivious compaction keep the plaintext rows."""
    from mpckv.protocols import audit
    from mpckv.protocols import mpcache_secure as ms
    from mpckv.protocols.persistent_cache import PersistentLayerCache
    from mpckv.protocols.secure_cache import SecureLayerCache

    comm.install()
    passed = []

    @party_settings(max_examples=4)
    @given(
        seed=st.integers(0, 2**16),
        n0=st.integers(24, 40),
        mode=st.sampled_from(["layer", "head"]),
        ratio=st.sampled_from([0.4, 0.6]),
    )
    def prop(seed, n0, mode, ratio):
        hk, g, d = 2, 2, 8
        cfg = _cfg(1, h=hk * g, hk=hk, d=d)
        gen = torch.Generator().manual_seed(seed)
        K = _quant(torch.randn(1, hk, n0, d, generator=gen))
        V = _quant(torch.randn(1, hk, n0, d, generator=gen))
        Q = _quant(torch.randn(1, hk * g, n0, d, generator=gen))
        scale = d**-0.5
        method = MPCache(budget=8, static_ratio=ratio, static_mode=mode, dense_layers=(), share="none")
        lengths = torch.tensor([n0])
        wins = static_window_sizes(lengths, method.window_frac)
        keep = static_keep_counts(lengths, ratio, method.sinks, wins)
        votes = static_scores(Q, K, lengths, wins, scale, mode, method.group_reduce)
        forced = static_forced(lengths, wins, method.sinks, n0)[:, None].expand(1, hk, n0)
        assume(boundary_gap(votes, keep[:, None].expand(1, hk), forced) > 4 * STATIC_TOL)
        index, valid = select_topk(votes, keep[:, None].expand(1, hk), forced=forced)
        for kind in (SecureLayerCache, PersistentLayerCache):
            for leaky in (False, True):
                method.leaky = leaky
                cache = kind(1, hk, d)
                cache.append(_share(K), _share(V), torch.arange(n0)[None])
                ctx = PrefillContext(0, cfg, cache, _share(Q), lengths, scale, {}, torch.zeros(1), [], None)
                w = int(wins[0])
                mass = _reveal(ms.static_window_scores(method, ctx.q, cache, n0, w, scale))
                heads = hk * g if mode == "layer" else g
                err = float((mass / heads - votes[:, : 1 if mode == "layer" else hk].double()).abs().max())
                assert err <= STATIC_TOL, err
                with audit.recording() as log:
                    choice = ms.static_choice(method, ctx)
                    assert choice is not None and choice.kept == int(keep[0])
                    ms.apply_static(cache, choice)
                want_reveals = (
                    [((1, 1 if mode == "layer" else hk, choice.hi - choice.lo), None)] if leaky else []
                )
                assert [(e.shape, e.dst) for e in log] == want_reveals
                assert int(cache.lengths[0, 0]) == int(keep[0])
                gi = index[..., None].expand(1, hk, index.shape[-1], d)
                assert torch.equal(_reveal(cache.keys()), K.double().gather(2, gi))
                assert torch.equal(_reveal(cache.values()), V.double().gather(2, gi))
                if leaky:
                    assert torch.equal(cache.positions(), index)
                else:  # middle positions are secret: public metadata is a placeholder
                    pub = cache.positions()[0, 0]
                    assert torch.equal(pub[: choice.lo], torch.arange(choice.lo))
                    assert bool((pub[choice.lo : choice.lo + choice.k_mid] == ms.SECRET_POSITION).all())
        passed.append(seed)

    prop()
    assert passed


def check_follower_spends_no_selection_traffic() -> None:
    """Layer 3 (follower of 2) returns layer 2's selection with zero bytes; its gather reads its own K."""
    from mpckv.protocols import mpcache_secure as ms
    from mpckv.protocols.secure_cache import SecureLayerCache

    comm.install()
    hk, g, d, n = 2, 2, 8, 30
    cfg = _cfg(4, h=hk * g, hk=hk, d=d)
    gen = torch.Generator().manual_seed(7)
    method = MPCache(budget=12, cluster_sizes=(8, 4), dense_layers=(0, 1))
    states: list[dict] = [{} for _ in range(4)]
    q = _share(_quant(torch.randn(1, hk * g, d, generator=gen)))
    plain_k, sels, bytes_ = [], [], []
    for layer in (2, 3):
        K = _quant(torch.randn(1, hk, n, d, generator=gen))
        cache = SecureLayerCache(1, hk, d)
        cache.append(_share(K), _share(K + 1), torch.arange(n)[None])
        ctx = DecodeContext(layer, cfg, cache, q, torch.tensor([n]), 0, 1.0, states[layer], states, None)
        comm.reset()
        with comm.labels(phase="selection", layer=layer):
            sels.append(ms.select(method, ctx))
        bytes_.append(comm.snapshot().bytes_total)
        plain_k.append((K, cache))
    assert bytes_[0] > 0 and bytes_[1] == 0, bytes_
    assert sels[1] is sels[0] and sels[0] is not None and sels[0].gather is not None
    # the follower's gather applies the leader's secret one-hot to its own cache
    choice = states[2]["mpcache_levels"]
    picked = [torch.nonzero(_bits(choice.final.bits)[0, h]).flatten() for h in range(hk)]
    for K, cache in plain_k:
        k_rows, _, lengths, _ = sels[0].gather(cache)
        for h in range(hk):
            tok = (picked[h][:, None] * 4 + torch.arange(4)).flatten()
            tok = tok[tok < n]
            assert torch.equal(_reveal(k_rows)[0, h], K[0, h, tok].double())
        assert int(lengths[0, 0]) == choice.rows


CHECKS = [
    check_selection_and_gather_parity,
    check_static_eviction_parity,
    check_follower_spends_no_selection_traffic,
]
register_checks("2pc-mpcache", CHECKS, world_size=2, timeout=400)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_mpcache_secure_in_two_parties(check):
    assert_check_passed("2pc-mpcache", check)


# ======================================================================================== generation
VARIANTS = [("stock", False), ("persistent", False), ("stock", True), ("persistent", True)]


def _gen_party(model_dir: str, prompt: list[int]) -> list[dict]:
    from mpckv.protocols import audit
    from mpckv.protocols.secure_generate import secure_generate

    out = []
    for kv_cache, leaky in VARIANTS:
        method = MPCache(**PARAMS, leaky=leaky)
        select_bytes: dict[int, int] = defaultdict(int)
        inner = method.select

        def counted(ctx: DecodeContext, inner: Any = inner, acc: dict = select_bytes) -> Any:
            before = comm.snapshot().bytes_total
            sel = inner(ctx)
            acc[ctx.layer] += comm.snapshot().bytes_total - before
            return sel

        method.select = counted  # type: ignore[method-assign]
        with audit.recording() as log:
            run = secure_generate(model_dir, prompt, NEW, method, kv_cache=kv_cache)  # type: ignore[arg-type]
        out.append(
            {
                "rank": run.rank,
                "tokens": run.tokens,
                "kept": run.stats.kept_per_layer,
                "read": run.stats.read_per_layer,
                "reveals": [(e.shape, e.dst) for e in log],
                "select_bytes": dict(select_bytes),
                "by_op": {k: v["bytes"] for k, v in run.comm.by_op.items()},
            }
        )
    return out


def _plain_run(model: LlamaModel, prompt: list[int]) -> tuple[list[int], Any, dict, float]:
    eng = mpckv.Engine(model, MPCache(**PARAMS))
    with recording_gaps() as rec:
        s = eng.prefill([prompt])
        toks, margins = [], []
        for _ in range(NEW):
            top2 = torch.topk(s.logits[0], 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = s.logits.argmax(-1)
            toks.append(int(nxt))
            if len(toks) < NEW:
                eng.decode(s, nxt)
    stats = eng._stats(s, [toks], 0.0, 0.0)
    return toks, stats, rec, min(margins)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpcache_secure_tiny")
    mpckv.save_model(_tiny_model(), path)
    return str(path)


def test_secure_generation_equals_plaintext(model_dir):
    model = mpckv.load_model(model_dir)
    # a prompt whose plaintext decisions all have clear gaps (fixed-point tolerance)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
        want, stats, rec, margin = _plain_run(model, prompt)
        if (
            margin > 0.02
            and min(rec["static"]) > 2 * STATIC_TOL
            and min(rec["select"]) > 5 * TOL
            and len(rec["select"]) > 0
        ):
            break
    else:
        pytest.fail("no prompt with clear gaps")
    results = run_parties(_gen_party, 2, timeout=400, args=(model_dir, prompt))
    by_rank = {r[0]["rank"]: r for r in results}
    n_mid = PROMPT_LEN - 4 - int(0.2 * PROMPT_LEN)
    for i, (kv_cache, leaky) in enumerate(VARIANTS):
        res = by_rank[1][i]
        assert res["tokens"] == want, (kv_cache, leaky)
        assert by_rank[0][i]["tokens"] is None
        assert res["kept"] == stats.kept_per_layer  # public sizes equal the plaintext ones
        assert res["read"] == stats.read_per_layer
        for r in by_rank.values():
            rep = r[i]["reveals"]
            tokens = [x for x in rep if x == ((1, VOCAB), 1)]
            assert len(tokens) == NEW
            leaks = [x for x in rep if x != ((1, VOCAB), 1)]
            assert leaks == ([((1, 1, n_mid), None)] * 2 if leaky else []), rep
            sb = r[i]["select_bytes"]
            assert sb.get(0, 0) == sb.get(1, 0) == 0  # dense layers
            assert sb[2] > 0 and sb[3] == 0  # layer 3 reuses layer 2's secret one-hot
            assert r[i]["by_op"]["selection"] > 0 and r[i]["by_op"]["gather"] > 0
