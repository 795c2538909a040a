"""RazorAttention oracles (card: shared/methods/razorattention.md)."""

from __future__ import annotations

import json

import pytest
import torch

import mpckv
from mpckv import ConfigError
from mpckv.plaintext.methods.razorattention import RazorAttention

from .test_snapkv import make_ctx


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _all_heads(cfg):
    return [[layer, h] for layer in range(cfg.num_hidden_layers) for h in range(cfg.num_key_value_heads)]


def _dense_and(model, method, prompts, steps=4):
    d_eng, m_eng = mpckv.Engine(model), mpckv.Engine(model, method)
    ds, ms = d_eng.prefill(prompts), m_eng.prefill(prompts)
    out = [(ds.logits, ms.logits)]
    for _ in range(steps):
        tok = ds.logits.argmax(-1)
        out.append((d_eng.decode(ds, tok), m_eng.decode(ms, tok)))
    return out, ms


def test_all_heads_retrieval_is_dense(tiny_random_model):
    m = RazorAttention(heads=_all_heads(tiny_random_model.config), budget=6, sinks=2)
    pairs, ms = _dense_and(tiny_random_model, m, [_prompt(40), _prompt(23, 1)])
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert ms.cache.layers[0].lengths.tolist() == [[44, 44], [27, 27]]


def test_one_dropped_entry_is_exact(tiny_random_model):
    """|D| = 1: the compensation token is the dropped entry itself, so outputs equal dense."""
    n = 30
    m = RazorAttention(heads="none", budget=n, sinks=3)  # L_h = n - 3 - 1 ⇒ exactly one dropped
    pairs, ms = _dense_and(tiny_random_model, m, [_prompt(n, 2)])
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert ms.cache.layers[0].lengths.tolist() == [[n + 4, n + 4]]


def test_kept_pattern_and_compensation_means():
    ctx, _q, k = make_ctx([40, 25], layers=3, layer=1)
    v = ctx.cache.values().clone()
    m = RazorAttention(heads=[[1, 0]], budget=12, sinks=4)  # L_h = 12 - 4 - 1 = 7
    m.on_prefill(ctx)
    c = ctx.cache
    assert c.lengths.tolist() == [[40, 12], [25, 12]]  # retrieval head 0 untouched, head 1 compressed
    for b, n in enumerate([40, 25]):
        assert c.pos[b, 0, :n].tolist() == list(range(n))
        assert torch.equal(c.k[b, 0, :n], k[b, 0, :n])
        assert c.pos[b, 1, :12].tolist() == [0, 1, 2, 3, 4, *range(n - 7, n)]
        dropped = slice(4, n - 7)
        torch.testing.assert_close(c.k[b, 1, 4], k[b, 1, dropped].mean(0))
        torch.testing.assert_close(c.v[b, 1, 4], v[b, 1, dropped].mean(0))
        torch.testing.assert_close(c.k[b, 1, 5:12], k[b, 1, n - 7 : n])


def test_no_compensation_and_default_window():
    ctx, _q, k = make_ctx([40], layers=1)
    RazorAttention(heads="none", budget=10, sinks=2, compensation="none").on_prefill(ctx)
    assert ctx.cache.pos[0, 0, :10].tolist() == [0, 1, *range(32, 40)]
    m = RazorAttention(heads="none", min_window=3, compression=5.0)
    assert m.window(40, 0, 0) == 8 and m.window(10, 0, 0) == 3


def test_decode_appends_to_every_head(tiny_random_model):
    m = RazorAttention(heads=[[0, 0]], budget=8, sinks=2)
    eng = mpckv.Engine(tiny_random_model, m)
    s = eng.prefill([_prompt(30)])
    before = s.cache.layers[0].lengths.clone()
    for _ in range(3):
        eng.decode(s, s.logits.argmax(-1))
    assert (s.cache.layers[0].lengths - before).tolist() == [[3, 3]]
    assert s.cache.layers[0].lengths.tolist() == [[33, 11]]


def test_heads_sources(tiny_random_model, tmp_path):
    cfg = tiny_random_model.config
    with pytest.raises(ConfigError, match="no shipped calibration"):
        mpckv.Engine(tiny_random_model, "razorattention", budget=0.2)
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"retrieval_heads": [[2, 1]]}))
    assert RazorAttention(heads=str(path)).retrieval_heads(cfg) == {(2, 1)}
    path.write_text(json.dumps({"retrieval_heads": [[9, 0]]}))
    with pytest.raises(ConfigError, match="out of range"):
        RazorAttention(heads=str(path)).retrieval_heads(cfg)
    with pytest.raises(ConfigError):
        RazorAttention(heads=str(tmp_path / "missing.json")).retrieval_heads(cfg)
    with pytest.raises(ConfigError):
        RazorAttention(compensation="weighted")


def test_auto_finds_the_shipped_tiny_calibration():
    model = mpckv.load_model("tiny")
    heads = RazorAttention().retrieval_heads(model.config)
    assert heads and all(0 <= layer < 4 and 0 <= h < 2 for layer, h in heads)
    res = mpckv.Engine(model, "razorattention", budget=0.2).generate([list(b"abc" * 40)], 3, stop_tokens=[])
    assert res.stats.kept_fraction < 0.6
