"""DELTA (Entezari Zarch et al. 2025): page scores, Δ-layer plans and cross-layer reuse."""

from __future__ import annotations

import pytest
import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext
from mpckv.plaintext.methods.delta import Delta, default_layers
from mpckv.registry import get_method

CFG = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ctx_for(n: int, layer: int = 0, seed: int = 0) -> DecodeContext:
    g = torch.Generator().manual_seed(seed)
    cache = LayerCache(1, 2, 8, torch.float32, torch.device("cpu"))
    cache.append(
        torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g), torch.arange(n)[None]
    )
    return DecodeContext(
        layer, CFG, cache, torch.randn(1, 4, 8, generator=g), torch.tensor([n - 1]), 0, 0.35, {}
    )


def test_registered_and_default_layers():
    m = get_method("delta")
    assert isinstance(m, Delta) and m.needs_decode_probs and "2510.09883" in m.paper
    assert default_layers(28) == ([0, 1], [2, 14, 22]) and default_layers(24) == ([0], [1, 12, 19])
    assert default_layers(2) == ([], [0]) and default_layers(4) == ([0], [1])
    with pytest.raises(ConfigError):
        Delta(delta_layers=[7]).check(CFG)


def test_page_score_is_sum_of_max_prob_and_head_permutation_invariant():
    probs = torch.softmax(torch.randn(1, 4, 37, generator=torch.Generator().manual_seed(1)), -1)
    m = Delta(page_size=8)
    s = m.page_scores(probs, 2, share=True)
    tok = probs[0].amax(0)
    want = torch.stack([tok[i : i + 8].sum() for i in range(0, 37, 8)])
    torch.testing.assert_close(s[0, 0], want)
    torch.testing.assert_close(m.page_scores(probs[:, [3, 1, 0, 2]], 2, share=True), s)


def test_plan_forces_recent_pages_sorted_shared():
    ctx = ctx_for(100)
    probs = torch.softmax(torch.randn(1, 4, 100, generator=torch.Generator().manual_seed(2)), -1)
    m = Delta(budget=48, page_size=8, recent_pages=2)  # K = 6 pages, 1 forced (K // 4)
    sel = m.plan(ctx, probs)
    assert sel is not None
    rows = [sel.index[0, h][sel.valid[0, h]].tolist() for h in range(2)]
    assert rows[0] == rows[1] == sorted(set(rows[0]))
    pages = sorted({t // 8 for t in rows[0]})
    assert len(pages) == 6 and 12 in pages  # the page holding the newest token
    score = m.page_scores(probs, 2, share=True)[0, 0]
    score[12] = float("inf")
    assert pages == sorted(sorted(range(13), key=lambda u: (-float(score[u]), u))[:6])
    capped = Delta(budget=48, page_size=8, recent_pages=8).plan(ctx, probs)  # forced: min(8, K // 4) = 1
    assert capped is not None and torch.equal(capped.index, sel.index)
    assert Delta(budget=200, page_size=8).plan(ctx, probs) is None


def test_sparse_layers_reuse_latest_delta_plan(tiny_random_model):
    eng = Engine(tiny_random_model, "delta", budget=8, page_size=4, delta_layers=[0], warmup_layers=[])
    s = eng.prefill([prompt(48)])
    seen: list[tuple[int, torch.Tensor | None]] = []
    orig = eng.method.select

    def spy(ctx):
        sel = orig(ctx)
        seen.append((ctx.layer, None if sel is None else sel.index))
        return sel

    eng.method.select = spy  # type: ignore[method-assign]
    eng.decode(s, s.logits.argmax(-1))
    plan = s.states[0]["delta_plan"][3]
    assert seen[0] == (0, None)
    for layer, idx in seen[1:]:
        assert layer in (1, 2) and idx is not None and torch.equal(idx, plan.index)


def test_all_full_layers_equal_dense(tiny_random_model):
    p = prompt(48, 1)
    dense = Engine(tiny_random_model).generate([p], 5, stop_tokens=[])
    eng = Engine(tiny_random_model, "delta", budget=8, page_size=4, delta_layers=[0, 1, 2], warmup_layers=[])
    assert eng.generate([p], 5, stop_tokens=[]).tokens == dense.tokens
    sparse = Engine(tiny_random_model, "delta", budget=8, page_size=4).generate([p], 5, stop_tokens=[])
    assert sum(sparse.stats.read_per_layer) < sum(dense.stats.read_per_layer)
