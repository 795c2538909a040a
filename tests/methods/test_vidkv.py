"""VidKV oracles (card: shared/methods/vidkv.md): stores, residual, protection, bit accounting, quality."""

from __future__ import annotations

import math

import pytest
import torch

import mpckv
from mpckv.plaintext.methods.vidkv import PROTECTED
from mpckv.plaintext.storage.quantized_cache import QuantizedLayerCache


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(model, name, prompt, steps, **params):
    eng = mpckv.Engine(model, name, **params)
    s = eng.prefill([prompt])
    out = [s.logits]
    for _ in range(steps):
        out.append(eng.decode(s, s.logits.argmax(-1)))
    return s, torch.stack(out)


def test_stores_residual_and_protection(tiny_random_model):
    n, g, k = 45, 8, 12
    eng = mpckv.Engine(tiny_random_model, "vidkv", budget=k, group_size=g, protect_fraction=0.25)
    dense = mpckv.Engine(tiny_random_model).prefill([_prompt(n, 1)])
    s = eng.prefill([_prompt(n, 1)])
    protect = math.floor(0.25 * k)
    for step in range(12):
        total = n + step
        for layer, lc in enumerate(s.cache.layers):
            assert isinstance(lc, QuantizedLayerCache)
            d = lc.head_dim
            assert lc.key_codec.n_hi == d // 2  # ⌊(1.5 − 1)·d⌋ channels on the 2-bit path
            for h in range(lc.kv_heads):
                pos = lc.positions()[0, h, :total].tolist()
                assert sorted(pos) == list(range(total))
                n_lo = int(lc.lo.lengths[0, h])
                assert n_lo % g == 0
                n_hi = int(lc.hi.lengths[0, h])
                flags = lc.hi.meta[PROTECTED][0, h, :n_hi]
                assert int(flags.sum()) == protect
                residual = n_hi - protect
                assert k - protect <= residual < k - protect + g
                hi_pos = lc.hi.positions()[0, h, :n_hi]
                assert set(range(total - residual, total)) <= set(hi_pos.tolist())
                if step == 0:  # full precision entries are the dense ones, bit exact
                    ref = dense.cache[layer].keys()[0, h, hi_pos]
                    assert torch.equal(lc.hi.keys()[0, h, :n_hi], ref)
        eng.decode(s, s.logits.argmax(-1))


def test_protected_tokens_are_the_most_attended(tiny_random_model):
    from mpckv.plaintext.methods.h2o import SCORE

    p = _prompt(40, 4)
    h2o = mpckv.Engine(tiny_random_model, "h2o", budget=1.0).prefill([p])  # keeps everything, scores all
    s = mpckv.Engine(tiny_random_model, "vidkv", budget=10, group_size=4, protect_fraction=0.3).prefill([p])
    for a, b in zip(s.cache.layers, h2o.cache.layers, strict=True):
        for h in range(a.kv_heads):
            n_hi = int(a.hi.lengths[0, h])
            prot = a.hi.positions()[0, h, :n_hi][a.hi.meta[PROTECTED][0, h, :n_hi] > 0]
            score = b.meta[SCORE][0, h, :33]  # candidates: all but the 7 recent tokens
            assert set(prot.tolist()) == set(torch.topk(score, 3).indices.tolist())


def test_more_bits_are_closer_to_dense(tiny_random_model):
    p = _prompt(64, 5)
    _, ld = _logits(tiny_random_model, "dense", p, 3)
    _, lo = _logits(tiny_random_model, "vidkv", p, 3, budget=8, group_size=8)
    _, hi = _logits(tiny_random_model, "vidkv", p, 3, budget=8, group_size=8, key_bits=2.0, value_bits=2)
    assert float((hi - ld).abs().mean()) < float((lo - ld).abs().mean())


def test_average_bits_match_the_formula(tiny_random_model):
    """Low store bytes per (token, head) = K: d/2 channels × 2 bit + d/2 coefficients × 1 bit, plus fp16
    (scale, zero) per 2-bit channel and fp16 scale per coefficient per group; V: ⌈d/5⌉ bytes + fp16 scale
    per channel per group."""
    g = 8
    s = mpckv.Engine(tiny_random_model, "vidkv", budget=8, group_size=g).prefill([_prompt(64, 6)])
    lc = s.cache[0]
    d = lc.head_dim
    per_group = g * math.ceil(d / 2 / 4) + (d // 2) * 4 + g * math.ceil(d / 2 / 8) + (d // 2) * 2
    per_group += g * math.ceil(d / 5) + d * 2
    assert lc.lo.live_bytes() == int(lc.lo.units.sum()) * per_group


@pytest.mark.parametrize("bad", [{"key_bits": 2.5}, {"value_bits": 1}, {"group_size": 0}])
def test_parameters_are_checked(bad):
    with pytest.raises(mpckv.ConfigError):
        mpckv.get_method("vidkv", **bad)
