"""H2O oracles (card: shared/methods/h2o.md): decode-time heavy-hitter eviction, prefill-only variant."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv import ConfigError
from mpckv.plaintext.methods.h2o import H2O
from mpckv.plaintext.methods.h2o_window import H2OWindow

from .test_snapkv import assert_dense_equivalent, cache_keep, make_ctx, prompt


class Reference:
    """Naive H2O on one sequence: full K/V kept forever, evicted entries *masked* (the official ``utils_hh``
    simulation), explicit fp32 softmax with explicit masks, scores accumulated as Python-visible tensors."""

    def __init__(self, model, ids, k, recent, group_reduce="sum"):
        self.m, self.k, self.recent, self.red = model, k, recent, group_reduce
        cfg = model.config
        self.g = cfg.num_attention_heads // cfg.num_key_value_heads
        n = len(ids)
        pos = torch.arange(n)[None]
        hidden = model.embed(torch.tensor([ids]))
        self.K, self.V, self.S, self.keep = [], [], [], []
        for layer in range(cfg.num_hidden_layers):
            q, kk, v = model.qkv(layer, hidden, pos)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            out, probs = self._attend(q[0], kk[0], v[0], causal[None].expand(kk.shape[1], n, n))
            self.K.append(kk[0])
            self.V.append(v[0])
            self.S.append(self._reduce(probs.sum(1)))  # [Hk, n]: column sums over all prompt queries
            self.keep.append(torch.ones(kk.shape[1], n, dtype=torch.bool))
            self._evict(layer)
            hidden = model.finish_layer(layer, hidden, out[None])
        self.logits = model.logits(hidden[:, -1:])[:, 0]
        self.pos = n

    def _reduce(self, x):  # [H, ...] -> [Hk, ...]
        x = x.view(-1, self.g, *x.shape[1:])
        return x.sum(1) if self.red == "sum" else x.mean(1)

    def _attend(self, q, k, v, mask):
        """q [H, T, d], k/v [Hk, L, d], mask [Hk, T, L] → out [H, T, d], probs [H, T, L] (explicit)."""
        kr, vr = k.repeat_interleave(self.g, 0), v.repeat_interleave(self.g, 0)
        mr = mask.repeat_interleave(self.g, 0)
        logits = (q.float() @ kr.float().transpose(-1, -2)) * self.m.scale
        logits = logits.masked_fill(~mr, float("-inf"))
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        probs = e / e.sum(-1, keepdim=True)
        return probs @ vr.float(), probs

    def _evict(self, layer):
        keep, s = self.keep[layer], self.S[layer]
        for h in range(keep.shape[0]):
            kept = keep[h].nonzero().flatten().tolist()
            while len(kept) > self.k:
                cands = kept[: len(kept) - self.recent]
                worst = min(cands, key=lambda j: (float(s[h, j]), -j))  # ties: the higher index goes
                keep[h, worst] = False
                kept.remove(worst)

    def step(self, token):
        cfg = self.m.config
        hidden = self.m.embed(torch.tensor([[token]]))
        for layer in range(cfg.num_hidden_layers):
            q, kk, v = self.m.qkv(layer, hidden, torch.tensor([[self.pos]]))
            self.K[layer] = torch.cat([self.K[layer], kk[0]], 1)
            self.V[layer] = torch.cat([self.V[layer], v[0]], 1)
            self.keep[layer] = torch.cat([self.keep[layer], torch.ones(kk.shape[1], 1, dtype=torch.bool)], 1)
            self.S[layer] = torch.cat([self.S[layer], torch.zeros(kk.shape[1], 1)], 1)
            out, probs = self._attend(q[0], self.K[layer], self.V[layer], self.keep[layer][:, None, :])
            self.S[layer] += self._reduce(probs[:, 0])
            self._evict(layer)
            hidden = self.m.finish_layer(layer, hidden, out[None])
        self.pos += 1
        self.logits = self.m.logits(hidden)[:, 0]


def check_against_reference(session, b, ref, atol=2e-5):
    torch.testing.assert_close(session.logits[b : b + 1], ref.logits, atol=atol, rtol=1e-4)
    for layer, lc in enumerate(session.cache.layers):
        for h in range(lc.kv_heads):
            n = int(lc.lengths[b, h])
            pos = lc.pos[b, h, :n]
            assert pos.tolist() == ref.keep[layer][h].nonzero().flatten().tolist(), (layer, h)
            score = lc.meta["h2o_score"][b, h, :n]
            torch.testing.assert_close(score, ref.S[layer][h, pos], atol=atol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- engine


def test_budget_at_least_length_is_dense(tiny_random_model):
    prompts = [prompt(20), prompt(13, 1)]
    assert_dense_equivalent(tiny_random_model, "h2o", prompts, new=5, budget=26)
    assert_dense_equivalent(tiny_random_model, "h2o", prompts, new=5, heavy_ratio=1.0, recent_ratio=1.0)


def test_masked_reference_logits_kept_sets_and_scores(tiny_random_model):
    """Compacted-cache H2O == naive masked full-cache H2O (official simulation): logits, kept sets, and the
    accumulated score of every kept entry == the sum of the attention it received (group-summed)."""
    model, steps = tiny_random_model, 6
    prompts = [prompt(24, 7), prompt(17, 8)]
    eng = mpckv.Engine(model, "h2o", budget=10)  # k = 10, k_r = 5
    s = eng.prefill(prompts)
    refs = [Reference(model, p, 10, 5) for p in prompts]
    toks = torch.randint(0, 300, (steps, 2), generator=torch.Generator().manual_seed(9))
    for t in range(steps + 1):
        for b, ref in enumerate(refs):
            check_against_reference(s, b, ref)
        if t == steps:
            break
        eng.decode(s, toks[t])
        for b, ref in enumerate(refs):
            ref.step(int(toks[t, b]))


def test_mean_group_reduce_and_default_ratios_match_reference(tiny_random_model):
    model = tiny_random_model
    p = prompt(40, 11)
    eng = mpckv.Engine(model, "h2o", group_reduce="mean")  # k_h = k_r = 4
    s = eng.prefill([p])
    ref = Reference(model, p, 8, 4, group_reduce="mean")
    for t in range(3):
        check_against_reference(s, 0, ref)
        eng.decode(s, torch.tensor([t + 1]))
        ref.step(t + 1)
    check_against_reference(s, 0, ref)


def test_lengths_recent_and_monotone_eviction_ragged(tiny_random_model):
    lengths, steps = [30, 21, 12], 8
    eng = mpckv.Engine(tiny_random_model, "h2o", budget=0.4, recent_fraction=0.25)
    s = eng.prefill([prompt(n, i) for i, n in enumerate(lengths)])
    ks = [int(0.4 * n + 1e-9) for n in lengths]  # 12, 8, 4
    recents = [k // 4 for k in ks]  # 3, 2, 1
    prev = [cache_keep(lc) for lc in s.cache.layers]
    evicted = [set() for _ in s.cache.layers]
    for t in range(1, steps + 1):
        eng.decode(s, s.logits.argmax(-1))
        for layer, lc in enumerate(s.cache.layers):
            now = cache_keep(lc)
            for (b, h), pos in now.items():
                n = lengths[b]
                assert len(pos) == min(n + t, ks[b])
                assert pos == sorted(set(pos))
                assert pos[-recents[b] :] == list(range(n + t - recents[b], n + t)), "recent window kept"
                gone = set(prev[layer][b, h]) | {n + t - 1}
                gone -= set(pos)
                assert len(gone) == 1, "exactly one eviction per step once full"
                evicted[layer] |= {(b, h, x) for x in gone}
                assert not any((b, h, x) in evicted[layer] for x in pos), "an evicted token came back"
            prev[layer] = now


def test_prefill_normalized_scores_and_counts():
    lengths = [20, 14]
    ctx, _, _ = make_ctx(lengths, seed=3)
    raw = H2O(budget=100, group_reduce="sum")
    ctx_raw, _, _ = make_ctx(lengths, seed=3)
    raw.on_prefill(ctx_raw)
    H2O(budget=8, recent_fraction=0.25, normalize=True).on_prefill(ctx)  # k = 8, k_r = 2
    for b, n in enumerate(lengths):
        for h in range(2):
            s = ctx_raw.cache.meta["h2o_score"][b, h, :n]
            count = torch.arange(n, 0, -1).float()
            ranked = sorted(range(n - 2), key=lambda j: (-float(s[j] / count[j]), j))[:6]
            assert cache_keep(ctx.cache)[b, h] == sorted(ranked) + [n - 2, n - 1]
            kept = torch.tensor(cache_keep(ctx.cache)[b, h])
            assert ctx.cache.meta["h2o_count"][b, h, :8].tolist() == (n - kept).float().tolist()
    # column sums of all queries: every query row sums to 1, so the scores of a row sum to G * N
    tot = ctx_raw.cache.meta["h2o_score"][:, :, :20].sum(-1)
    torch.testing.assert_close(tot, torch.tensor([[40.0, 40.0], [28.0, 28.0]]), atol=1e-4, rtol=1e-5)


def test_h2o_window_with_full_window_equals_h2o_prefill_scores():
    """Noise-free equivalence: window ≥ N votes are H2O's prefill column sums (normalize off)."""
    for reduce in ("sum", "mean"):
        lengths = [18, 11]
        ctx_w, _, _ = make_ctx(lengths, seed=4)
        ctx_h, _, _ = make_ctx(lengths, seed=4)
        votes = H2OWindow(window=64, group_reduce=reduce).scores(ctx_w)
        H2O(budget=64, group_reduce=reduce).on_prefill(ctx_h)
        for b, n in enumerate(lengths):
            sh = ctx_h.cache.meta["h2o_score"][b, :, :n]
            torch.testing.assert_close(votes[b, :, :n], sh, atol=1e-6, rtol=1e-5)
            assert torch.equal(votes[b, :, :n].argsort(dim=-1, stable=True), sh.argsort(dim=-1, stable=True))


def test_h2o_window_kept_counts_and_window(tiny_random_model):
    lengths = [33, 20]
    eng = mpckv.Engine(tiny_random_model, "h2o_window", budget=0.5, window=5)
    s = eng.prefill([prompt(n, i) for i, n in enumerate(lengths)])
    for lc in s.cache.layers:
        for (b, _h), pos in cache_keep(lc).items():
            n = lengths[b]
            assert len(pos) == n // 2 and pos[-5:] == list(range(n - 5, n))
    assert_dense_equivalent(tiny_random_model, "h2o_window", [prompt(15)], new=3, budget=15, window=4)


def test_validation():
    for bad in (
        {"heavy_ratio": 1.5},
        {"recent_ratio": -0.1},
        {"recent_fraction": 2},
        {"group_reduce": "max"},
    ):
        with pytest.raises(ConfigError):
            H2O(**bad)
    with pytest.raises(ConfigError):
        H2OWindow(window=0)
    assert H2O().split(40) == (8, 4)
    assert H2O(budget=10).split(4) == (10, 5)  # token budgets are not clamped to the prompt
    assert H2O(budget=0.5, recent_fraction=0.0).split(20) == (10, 0)
