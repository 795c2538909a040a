"""The fusion cards' oracles on the selective-recompute driver and the four methods."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv.errors import ConfigError
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion.a3 import question_attention
from mpckv.plaintext.fusion.assemble import compute_chunk
from mpckv.plaintext.fusion.cacheblend import CacheBlend
from mpckv.plaintext.fusion.rerotate import rotate_chunk
from mpckv.plaintext.fusion.store import ChunkKVStore, model_fingerprint

from .helpers import make_model, rand_ids

LENS = (20, 17, 25)
Q = 6


def segments(seed=0):
    return [Chunk(rand_ids(n, seed + i + 1)) for i, n in enumerate(LENS)] + [Raw(rand_ids(Q, seed + 9))]


def flat(segs):
    return [t for s in segs for t in s.token_ids]


def assert_same_as_full(model, out, segs, atol=1e-4):
    full = mpckv.Engine(model).prefill([flat(segs)])
    torch.testing.assert_close(out.session.logits, full.logits, atol=atol, rtol=1e-4)
    for a, b in zip(out.session.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(a.keys(), b.keys(), atol=atol, rtol=1e-4)
        torch.testing.assert_close(a.values(), b.values(), atol=atol, rtol=1e-4)


FULL_PARAMS = {
    "cacheblend": {"ratio": 1.0},
    "a3": {"ratio": 1.0},
    "kvshare": {"ratio": 1.0},
    "epic": {"k": 1000},
    "cacheblend_br": {"ratio": 1.0, "mask": "bottom_right"},
}


@pytest.mark.parametrize("rope", ["default", "llama3"])
@pytest.mark.parametrize("name", sorted(FULL_PARAMS))
def test_ratio_one_equals_full_prefill(name, rope):
    m = make_model(rope)
    out = mpckv.Engine(m).prefill_segments(segments(), name.split("_")[0], **FULL_PARAMS[name])
    assert out.stats.fused
    assert_same_as_full(m, out, segments())


def _concat_reference(m, segs):
    """Re-rotated standalone chunk caches concatenated, then the raw suffix teacher-forced by decode."""
    eng = mpckv.Engine(m)
    ks, vs, off = [], [], 0
    for s in segs[:-1]:
        k, v = compute_chunk(m, s.token_ids)
        ks.append(rotate_chunk(k, off, m.inv_freq))
        vs.append(v)
        off += len(s.token_ids)
    cfg = m.config
    cache = mpckv.plaintext.kv_cache.KVCache(
        cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, m.dtype, m.device
    )
    for layer in range(cfg.num_hidden_layers):
        k = torch.cat([x[layer] for x in ks], dim=1)[None]
        v = torch.cat([x[layer] for x in vs], dim=1)[None]
        cache[layer].append(k, v, torch.arange(off)[None])
    lengths = torch.tensor([off])
    nl = cfg.num_hidden_layers
    sess = mpckv.Session(
        cache,
        lengths.clone(),
        lengths,
        [{} for _ in range(nl)],
        torch.zeros(1, cfg.vocab_size),
        read_sums=[0.0] * nl,
        dense_lengths=lengths.clone(),
    )
    logits = eng.extend(sess, torch.tensor([list(segs[-1].token_ids)]))
    return sess, logits[:, -1]


@pytest.mark.parametrize(
    "fusion,params",
    [
        ("concat", {}),
        ("cacheblend", {"ratio": 0.0, "full_layers": 0, "check_writeback": False}),
        ("epic", {"k": 0}),
    ],
)
def test_ratio_zero_equals_concatenated_rotated_caches(model, fusion, params):
    segs = segments(3)
    out = mpckv.Engine(model).prefill_segments(segs, fusion, **params)
    ref, logits = _concat_reference(model, segs)
    torch.testing.assert_close(out.session.logits, logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.session.cache.layers, ref.cache.layers, strict=True):
        torch.testing.assert_close(a.keys(), b.keys(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values(), b.values(), atol=1e-4, rtol=1e-4)
    assert out.stats.recomputed_cached == 0


@pytest.mark.parametrize("name", ["cacheblend", "a3", "kvshare", "epic", "concat"])
def test_single_chunk_at_offset_zero_is_its_prefix_cache(model, name):
    segs = [Chunk(rand_ids(30, 5)), Raw(rand_ids(Q, 6))]
    out = mpckv.Engine(model).prefill_segments(segs, name)
    full = mpckv.Engine(model).prefill([flat(segs)])
    for a, b in zip(out.session.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(a.keys()[:, :, :30], b.keys()[:, :, :30], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values()[:, :, :30], b.values()[:, :, :30], atol=1e-5, rtol=1e-5)
    # the cached prefix is exact, so every method reproduces the full prefill
    assert_same_as_full(model, out, segs)


@pytest.mark.parametrize("name", ["cacheblend", "a3", "kvshare", "epic"])
def test_non_selected_rows_unchanged_and_budget(model, name):
    segs = segments(7)
    store = ChunkKVStore(model_fingerprint(model))
    out = mpckv.Engine(model).prefill_segments(segs, name, store=store)
    prompt = out.prompt
    assert prompt is not None
    n_ctx = sum(LENS)
    sel = out.selected
    assert sel.tolist() == sorted(set(sel.tolist())) and bool(prompt.cached[sel].all())
    if name == "epic":
        want = [s + i for s in (LENS[0], LENS[0] + LENS[1]) for i in range(2)]
        assert sel.tolist() == want
    else:
        assert sel.numel() == int(0.15 * n_ctx)
    first_partial = 0 if name == "epic" else 1
    rows = set(sel.tolist()) | set(range(n_ctx, n_ctx + Q))
    keep = torch.tensor([i not in rows for i in range(n_ctx + Q)])
    for layer, lc in enumerate(out.session.cache.layers):
        if layer <= first_partial and name != "epic":
            continue
        assert torch.equal(lc.keys()[0][:, keep], prompt.k_old[layer][:, keep])
        assert torch.equal(lc.values()[0][:, keep], prompt.v_old[layer][:, keep])
        if layer == 0:  # layer-0 values depend on the token only: recomputing them changes nothing
            continue
        changed = (lc.values()[0][:, sel] - prompt.v_old[layer][:, sel]).abs().amax(dim=(0, 2))
        assert bool((changed > 0).all())
    assert out.stats.chunk_misses == 3 and out.stats.chunk_hits == 0
    again = mpckv.Engine(model).prefill_segments(segs, name, store=store)
    assert again.stats.chunk_hits == 3 and again.stats.chunk_misses == 0
    torch.testing.assert_close(again.session.logits, out.session.logits, atol=0, rtol=0)


class _Spy(CacheBlend):
    seen: list = []

    def choose(self, inp):
        _Spy.seen.append(inp)
        return super().choose(inp)


def test_check_layer_sees_full_prefill_values(model):
    """With layer 0 fully recomputed, fresh V at layer 1 equals a reference full prefill's V, so the
    deviation CacheBlend ranks is the true one; A³'s score is the reference attention column sum."""
    segs = segments(11)
    _Spy.seen.clear()
    mpckv.Engine(model).prefill_segments(segs, _Spy(ratio=0.2))
    inp = _Spy.seen[0]
    full = mpckv.Engine(model).prefill([flat(segs)])
    torch.testing.assert_close(inp.v, full.cache[1].values()[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inp.k, full.cache[1].keys()[0], atol=1e-5, rtol=1e-5)
    dev = (full.cache[1].values()[0] - inp.v_old).pow(2).sum(dim=(0, 2))
    want = torch.topk(dev.masked_fill(~inp.cached, -1), inp.budget).indices.sort().values
    assert CacheBlend(ratio=0.2).choose(inp).tolist() == want.tolist()
    # A³ head-merged score against a naive per-head loop
    h, d = inp.q.shape[0], inp.q.shape[2]
    qrows = list(range(sum(LENS), sum(LENS) + Q))
    kk = inp.k.repeat_interleave(h // inp.k.shape[0], dim=0)
    logits = sum(inp.q[j, qrows] @ kk[j].T for j in range(h)) / (h * d) ** 0.5
    n = inp.k.shape[1]
    allowed = torch.arange(n)[None] <= torch.tensor(qrows)[:, None]
    ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).sum(0)
    pos = torch.arange(n)
    got = question_attention(inp.q[:, qrows], inp.k, pos[qrows], pos, merge_heads=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_fusion_then_eviction_and_decode(model):
    segs = segments(13)
    eng = mpckv.Engine(model, "cacheblend+snapkv", budget=0.5, window=4)
    out = eng.prefill_segments(segs)
    n = sum(LENS) + Q
    assert all(int(lc.lengths.max()) < n for lc in out.session.cache.layers)
    res = eng.continue_generation(out.session, 5, stop_tokens=[])
    assert len(res.tokens[0]) == 5
    # the engine's own method applies after an explicitly chosen fusion method
    plain = mpckv.Engine(model, "snapkv", budget=0.5, window=4).prefill_segments(segs, "epic")
    assert all(int(lc.lengths.max()) < n for lc in plain.session.cache.layers)


def test_decode_after_full_ratio_matches_generate(model):
    segs = segments(17)
    eng = mpckv.Engine(model)
    out = eng.prefill_segments(segs, "kvshare", ratio=1.0)
    fused = eng.continue_generation(out.session, 6, stop_tokens=[])
    assert fused.tokens == eng.generate([flat(segs)], 6, stop_tokens=[]).tokens


def test_errors(model):
    eng = mpckv.Engine(model)
    with pytest.raises(ConfigError, match="needs a fusion method"):
        eng.prefill_segments(segments())
    with pytest.raises(ConfigError, match="not a fusion method"):
        eng.prefill_segments(segments(), "snapkv")
    with pytest.raises(ConfigError, match="ratio"):
        eng.prefill_segments(segments(), "cacheblend", ratio=1.5)
    with pytest.raises(ConfigError, match="segment"):
        eng.prefill_segments([[1, 2, 3]], "cacheblend")
    full = eng.prefill_segments(segments(), "full")
    assert not full.stats.fused and full.stats.recompute_ratio == 1.0


def test_fusion_methods_listed():
    fusion = {m.name for m in mpckv.list_methods() if m.family == "fusion"}
    assert {"cacheblend", "epic", "a3", "kvshare"} <= fusion
