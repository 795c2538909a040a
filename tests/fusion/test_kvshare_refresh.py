"""KVShare's decode-time refresh rows (the card's decode oracles)."""

from __future__ import annotations

import copy

import pytest
import torch

import mpckv
from mpckv.errors import ConfigError
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion.refresh import refresh_step, start_refresh

from .helpers import rand_ids

LENS = (20, 17, 25)
Q = 6


def segments(seed=0):
    return [Chunk(rand_ids(n, seed + i + 1)) for i, n in enumerate(LENS)] + [Raw(rand_ids(Q, seed + 9))]


def _caches(session):
    return [(lc.keys().clone(), lc.values().clone()) for lc in session.cache.layers]


def test_no_refresh_rows_equals_plain_decode(model):
    eng = mpckv.Engine(model)
    a = eng.prefill_segments(segments(), "kvshare", ratio=0.2)
    b = copy.deepcopy(a)
    state = start_refresh(a, 0, 1)
    for tok in (5, 77, 3):
        got = refresh_step(eng, a.session, state, tok)
        want = eng.decode(b.session, torch.tensor([tok]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state.history == []
    for (ka, va), (kb, vb) in zip(_caches(a.session), _caches(b.session), strict=True):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_refreshing_exact_rows_changes_nothing(model):
    """After ratio 1 every row is exact: refreshing any of them leaves cache and logits as plain decode."""
    eng = mpckv.Engine(model)
    a = eng.prefill_segments(segments(1), "kvshare", ratio=1.0)
    b = copy.deepcopy(a)
    state = start_refresh(a, 3, 1)
    assert bool(state.done.all())
    rows = torch.tensor([0, 21, 40, 61])
    got = refresh_step(eng, a.session, state, 9, rows=rows)
    want = eng.decode(b.session, torch.tensor([9]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (ka, va), (kb, vb) in zip(_caches(a.session), _caches(b.session), strict=True):
        torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4)
    assert state.pending.numel() == 0  # nothing left to refresh


def test_refresh_rows_recompute_like_selection(model):
    """Refreshing a row recomputes it at its position: rows outside it stay bit-identical, the row changes,
    no row is refreshed twice and every refreshed row was reused (cached, not recomputed at prefill)."""
    eng = mpckv.Engine(model)
    out = eng.prefill_segments(segments(2), "kvshare", ratio=0.1, refresh=2)
    state = start_refresh(out, 2, 1)
    reused0 = ~state.done.clone()
    n = out.prompt.num_tokens
    seen: list[int] = []
    for step, tok in enumerate((4, 8, 15, 16, 23)):
        before = _caches(out.session)
        rows = state.pending.clone()
        refresh_step(eng, out.session, state, tok)
        if step == 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() == 2
        keep = torch.ones(n, dtype=torch.bool)
        keep[rows] = False
        for layer, ((kb, vb), lc) in enumerate(zip(before, out.session.cache.layers, strict=True)):
            assert torch.equal(lc.keys()[:, :, :n][:, :, keep], kb[:, :, :n][:, :, keep])
            assert torch.equal(lc.values()[:, :, :n][:, :, keep], vb[:, :, :n][:, :, keep])
            if layer >= 2 and rows.numel():
                assert not torch.allclose(lc.values()[:, :, rows], vb[:, :, rows])
        seen.extend(rows.tolist())
    assert len(seen) == len(set(seen)) == 8
    assert bool(reused0[torch.tensor(seen)].all())
    assert state.history == seen


def test_pick_uses_decode_attention_times_delta(model):
    """The chosen rows are the top α_t·δ among reused rows, with α_t from a naive per-head softmax."""
    eng = mpckv.Engine(model)
    out = eng.prefill_segments(segments(3), "kvshare", ratio=0.1)
    state = start_refresh(out, 3, 1)
    sess = out.session
    tok, pos = 11, int(sess.positions[0])
    refresh_step(eng, sess, state, tok)
    # reference α at layer 1 from a separate dense decode of the same token on a copy of the prefill
    ref = copy.deepcopy(out)
    m = model
    hidden = m.embed(torch.tensor([[tok]]))
    q, k, v = m.qkv(0, hidden, torch.tensor([[pos]]))
    ref.session.cache[0].append(k, v, torch.tensor([[pos]]))
    attn = torch.nn.functional.scaled_dot_product_attention(
        q, ref.session.cache[0].keys(), ref.session.cache[0].values(), scale=m.scale, enable_gqa=True
    )
    hidden = m.finish_layer(0, hidden, attn)
    q1, k1, _ = m.qkv(1, hidden, torch.tensor([[pos]]))
    keys = torch.cat([ref.session.cache[1].keys(), k1], dim=2)[0]
    g = q1.shape[1] // keys.shape[0]
    probs = torch.stack(
        [torch.softmax(q1[0, h, 0] @ keys[h // g].T * m.scale, -1) for h in range(q1.shape[1])]
    )
    alpha = probs.mean(0)[: out.prompt.num_tokens]
    score = (alpha * state.delta).masked_fill(state.done, -1)
    want = torch.topk(score, 3).indices.sort().values
    assert state.pending.tolist() == want.tolist()


def test_generate_dispatch_and_errors(model):
    eng = mpckv.Engine(model)
    out = eng.prefill_segments(segments(4), "kvshare", ratio=0.15, refresh=3)
    toks = out.generate(eng, 6, stop_tokens=[])
    assert len(toks) == 6 and len(out.refresh.history) == 3 * 4
    plain = eng.prefill_segments(segments(4), "kvshare", ratio=0.15, refresh=0)
    assert (
        plain.generate(eng, 6, stop_tokens=[])
        == eng.continue_generation(
            eng.prefill_segments(segments(4), "kvshare", ratio=0.15).session, 6, stop_tokens=[]
        ).tokens[0]
    )
    with pytest.raises(ConfigError, match="refresh"):
        eng.prefill_segments(segments(4), "kvshare", refresh=-1)
    evicting = mpckv.Engine(model, "kvshare+snapkv", budget=0.5, window=4).prefill_segments(segments(4))
    with pytest.raises(ConfigError, match="eviction"):
        start_refresh(evicting, 3, 1)
