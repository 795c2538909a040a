"""MiKV oracles (card: shared/methods/mikv.md): drop instead of quantize = H2O, 16 bits = dense, stores."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv import ConfigError
from mpckv.plaintext.methods.mikv import channel_balancer
from mpckv.plaintext.storage.quantized_cache import QuantizedLayerCache


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(model, name, prompts, steps, **params):
    eng = mpckv.Engine(model, name, **params)
    s = eng.prefill(prompts)
    logits = [s.logits]
    for _ in range(steps):
        logits.append(eng.decode(s, s.logits.argmax(-1)))
    return s, torch.stack(logits)


@pytest.mark.parametrize("budget", [0.3, 9])
def test_drop_instead_of_quantize_is_h2o(tiny_random_model, budget):
    prompts = [_prompt(40), _prompt(27, 1)]
    sm, lm = _run(tiny_random_model, "mikv", prompts, 6, budget=budget, low_bits=0)
    sh, lh = _run(tiny_random_model, "h2o", prompts, 6, budget=budget)
    torch.testing.assert_close(lm, lh, atol=1e-6, rtol=1e-6)
    for a, b in zip(sm.cache.layers, sh.cache.layers, strict=True):
        assert isinstance(a, QuantizedLayerCache) and a.lo.nbytes() == 0
        assert torch.equal(a.lengths, b.lengths)
        for r in range(2):
            for h in range(a.kv_heads):
                n = int(b.lengths[r, h])
                assert a.positions()[r, h, :n].tolist() == b.positions()[r, h, :n].tolist()


def test_sixteen_bits_is_dense(tiny_random_model):
    prompts = [_prompt(40)]
    _, lm = _run(tiny_random_model, "mikv", prompts, 4, budget=0.1, low_bits=16)
    _, ld = _run(tiny_random_model, "dense", prompts, 4)
    torch.testing.assert_close(lm, ld, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("every", [1, 3])
def test_every_token_in_one_store_and_demotion_is_irreversible(tiny_random_model, every):
    n, steps = 40, 7
    eng = mpckv.Engine(tiny_random_model, "mikv", budget=10, recent_fraction=0.4, demote_every=every)
    s = eng.prefill([_prompt(n, 2)])
    prev = None
    for t in range(steps + 1):
        lo_pos = []
        for lc in s.cache.layers:
            assert isinstance(lc, QuantizedLayerCache)
            total = n + t
            assert lc.lengths.eq(total).all()  # nothing dropped
            for h in range(lc.kv_heads):
                pos = lc.positions()[0, h, :total].tolist()
                assert sorted(pos) == list(range(total))
                # |I| = budget, plus the chosen entries of an unfinished block (moved every `every` steps)
                hi_len = int(lc.hi.lengths[0, h])
                assert hi_len == 10 + t % every
                hi_pos = lc.hi.positions()[0, h, :hi_len].tolist()
                assert set(range(total - 4, total)) <= set(hi_pos)  # the recent window stays high precision
                lo_pos.append(lc.lo.pos[0, h, : int(lc.lo.lengths[0, h])].tolist())
        if prev is not None:  # the low store only grows by appending
            assert all(new[: len(old)] == old for old, new in zip(prev, lo_pos, strict=True))
        prev = lo_pos
        if t < steps:
            eng.decode(s, s.logits.argmax(-1))


def test_block_demotion_makes_the_same_choices(tiny_random_model):
    """Demoting in blocks moves the entries the per-step schedule moves (8-bit codes: the full-precision
    reads of a block's chosen entries barely change the scores), and the output stays close."""
    prompts = [_prompt(44, 5)]
    runs = {}
    for every in (1, 4):
        eng = mpckv.Engine(tiny_random_model, "mikv", budget=12, low_bits=8, demote_every=every)
        s = eng.prefill(prompts)
        logits = []
        for _ in range(8):  # two whole blocks
            logits.append(eng.decode(s, s.logits.argmax(-1)))
        lo = [
            sorted(lc.lo.pos[0, h, : int(lc.lo.lengths[0, h])].tolist())
            for lc in s.cache.layers
            for h in range(lc.kv_heads)
        ]
        runs[every] = (lo, torch.stack(logits))
    assert runs[1][0] == runs[4][0]
    torch.testing.assert_close(runs[4][1], runs[1][1], atol=2e-2, rtol=0)


def test_more_bits_are_closer_to_dense(tiny_random_model):
    prompts = [_prompt(48, 3)]
    _, ld = _run(tiny_random_model, "dense", prompts, 4)
    err = {}
    for bits in (2, 4, 8):
        _, lm = _run(tiny_random_model, "mikv", prompts, 4, budget=0.15, low_bits=bits)
        err[bits] = float((lm - ld).abs().max())
    _, lh = _run(tiny_random_model, "h2o", prompts, 4, budget=0.15)
    assert err[8] < err[4] < err[2]
    assert err[8] < 0.05 * float((lh - ld).abs().max()) + 1e-3  # 8-bit ≈ dense, far better than dropping


def test_cache_is_smaller_than_dense(tiny_random_model):
    res = mpckv.Engine(tiny_random_model, "mikv", budget=0.1, low_bits=2).generate(
        [_prompt(48)], 4, stop_tokens=[]
    )
    dense = mpckv.Engine(tiny_random_model).generate([_prompt(48)], 4, stop_tokens=[])
    assert res.stats.live_cache_bytes < 0.35 * dense.stats.live_cache_bytes


def test_balancer_invariance_and_equalisation():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g) * torch.linspace(0.1, 4, 8)
    k = torch.randn(2, 2, 7, 8, generator=g) * torch.linspace(5, 0.1, 8)
    qlen, klen = torch.tensor([7, 5]), torch.tensor([[7, 7], [5, 5]])
    b = channel_balancer(q, k, qlen, klen)
    qb = q / b.repeat_interleave(2, 1)[:, :, None, :]
    kb = k * b[:, :, None, :]
    kr = k.repeat_interleave(2, 1)
    torch.testing.assert_close(qb @ kb.repeat_interleave(2, 1).transpose(-1, -2), q @ kr.transpose(-1, -2))
    for r in range(2):  # after balancing, max|q̃_c| (group) = max|k̃_c| per channel
        n = int(qlen[r])
        mq = qb[r, :, :n].abs().amax(1).view(2, 2, 8).amax(1)
        mk = kb[r, :, : int(klen[r, 0])].abs().amax(1)
        torch.testing.assert_close(mq, mk, rtol=1e-5, atol=1e-6)


def test_parameters_are_checked():
    with pytest.raises(ConfigError):
        mpckv.get_method("mikv", low_bits=5)
    with pytest.raises(ConfigError):
        mpckv.get_method("mikv", low_bits=1, symmetric=True)


def test_lowest_is_what_select_topk_leaves_out():
    """The decode fast path's pick = the one entry select_topk(n − 1) drops (ties, NaN, recent window)."""
    from mpckv.plaintext.kv_cache import LayerCache
    from mpckv.plaintext.methods.h2o import SCORE
    from mpckv.plaintext.methods.mikv import MiKV
    from mpckv.plaintext.methods.topk import select_topk

    g = torch.Generator().manual_seed(3)
    b, hk, n = 2, 3, 12
    lc = LayerCache(b, hk, 4, torch.float32, torch.device("cpu"))
    lc.append(torch.zeros(b, hk, n, 4), torch.zeros(b, hk, n, 4), torch.arange(n).expand(b, n))
    score = torch.randint(0, 4, (b, hk, n), generator=g).float()  # many ties
    score[0, 0, 2] = float("nan")
    lc.add_meta(SCORE)[:, :, :n] = score
    first_recent = torch.tensor([[8, 9, 12], [5, 10, 11]])
    slot = MiKV(budget=n - 1)._lowest(lc, first_recent)
    forced = torch.arange(n) >= first_recent[..., None]
    idx, val = select_topk(score, n - 1, forced, None)
    for r in range(b):
        for h in range(hk):
            left_out = set(range(n)) - set(idx[r, h][val[r, h]].tolist())
            assert left_out == {int(slot[r, h])}
