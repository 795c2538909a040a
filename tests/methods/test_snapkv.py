"""SnapKV oracles (card: shared/methods/snapkv.md) and synthetic helpers the PyramidKV / H2O tests reuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mpckv
from mpckv import ConfigError
from mpckv.config import ModelConfig
from mpckv.plaintext.attention import cache_attention
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import PrefillContext
from mpckv.plaintext.methods.scorers import pool_scores, window_votes
from mpckv.plaintext.methods.snapkv import SnapKV


def make_ctx(lengths, heads=4, kv_heads=2, d=8, layers=3, layer=0, seed=0, q_scale=2.0, zero_qk=False):
    """A prefill context for one layer: random ``q [B,H,T,d]``, cache holding random prompt K/V."""
    b, t = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, t, d, generator=g) * q_scale
    k = torch.randn(b, kv_heads, t, d, generator=g) * q_scale
    v = torch.randn(b, kv_heads, t, d, generator=g)
    if zero_qk:
        q.zero_()
        k.zero_()
    cache = LayerCache(b, kv_heads, d, torch.float32, torch.device("cpu"))
    cache.append(k, v, torch.arange(t).expand(b, t), counts=torch.tensor(lengths))
    cfg = ModelConfig(
        vocab_size=10,
        hidden_size=heads * d,
        intermediate_size=8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d,
    )
    ctx = PrefillContext(layer, cfg, cache, q, torch.tensor(lengths), d**-0.5, {}, torch.ones(d // 2), [])
    return ctx, q, k


def naive_head_votes(q, k, n, window, scale):
    """Explicit fp32 softmax of the last ``window`` queries; column sums over the first ``n - window`` keys.

    ``q [T, d]`` (one query head), ``k [T, d]`` (its KV head); returns a list of ``n - window`` floats.
    """
    p_len = n - window
    votes = torch.zeros(p_len, dtype=torch.float32)
    for i in range(p_len, n):
        logits = torch.stack([(q[i] * k[j]).sum() * scale for j in range(i + 1)])
        e = torch.exp(logits - logits.max())
        votes += (e / e.sum())[:p_len]
    return votes.tolist()


def naive_pool(x, kernel, pooling):
    """Stride-1 pooling with ``kernel // 2`` padding by explicit loops (-inf / zero padding)."""
    pad, out = kernel // 2, []
    for j in range(len(x)):
        vals = [x[j + o] if 0 <= j + o < len(x) else None for o in range(-pad, pad + 1)]
        if pooling == "max":
            out.append(max(v for v in vals if v is not None))
        else:
            out.append(sum(v for v in vals if v is not None) / kernel)
    return out


def naive_reduce(rows, how):
    cols = list(zip(*rows, strict=True))
    if how == "mean":
        return [sum(c) / len(c) for c in cols]
    if how == "sum":
        return [sum(c) for c in cols]
    return [max(c) for c in cols]


def naive_snapkv_keep(q, k, lengths, cap, window, kernel, pooling, reduce, scale):
    """Per (b, kv head): sorted kept positions of SnapKV and the score margin at the top-k cut."""
    b_, h, _, _ = q.shape
    hk = k.shape[1]
    g = h // hk
    keep, margins = {}, []
    for b in range(b_):
        n = lengths[b]
        for kh in range(hk):
            if n <= cap:
                keep[b, kh] = list(range(n))
                continue
            rows = [
                naive_pool(naive_head_votes(q[b, kh * g + i], k[b, kh], n, window, scale), kernel, pooling)
                for i in range(g)
            ]
            score = naive_reduce(rows, reduce)
            order = sorted(range(n - window), key=lambda j: (-score[j], j))
            m = cap - window
            if 0 < m < len(order):
                margins.append(score[order[m - 1]] - score[order[m]])
            keep[b, kh] = sorted(order[:m]) + list(range(n - window, n))
    return keep, margins


def clear_cut(margins):
    """Score gaps at the top-k cut are exact ties (max-pool copies: same value both sides) or clear."""
    return all(m == 0 or m > 1e-6 for m in margins)


def cache_keep(cache):
    """``{(b, h): kept positions}`` of a layer cache."""
    return {
        (b, h): cache.pos[b, h, : int(cache.lengths[b, h])].tolist()
        for b in range(cache.batch)
        for h in range(cache.kv_heads)
    }


def prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_dense_equivalent(model, method, prompts, new=5, **params):
    """Generation with ``method`` is bit-identical to dense: tokens, prefill and decode logits."""
    dense, eng = mpckv.Engine(model), mpckv.Engine(model, method, **params)
    ds, ms = dense.prefill(prompts), eng.prefill(prompts)
    assert torch.equal(ms.logits, ds.logits)
    for _ in range(new):
        tok = ds.logits.argmax(-1)
        assert torch.equal(eng.decode(ms, tok), dense.decode(ds, tok))
    assert ms.cache.mean_lengths() == ds.cache.mean_lengths()
    assert (
        eng.generate(prompts, new, stop_tokens=[]).tokens
        == dense.generate(prompts, new, stop_tokens=[]).tokens
    )


# ---------------------------------------------------------------------------------------------- engine


def test_budget_at_least_prompt_is_dense(tiny_random_model):
    prompts = [prompt(30), prompt(17, 1)]
    assert_dense_equivalent(tiny_random_model, "snapkv", prompts, budget=30, window=4)
    assert_dense_equivalent(tiny_random_model, "snapkv", prompts, budget=1.0, window=4)


def test_kept_counts_window_and_positions_ragged(tiny_random_model):
    lengths = [40, 23, 31]
    eng = mpckv.Engine(tiny_random_model, "snapkv", budget=0.5, window=4, kernel_size=3)
    s = eng.prefill([prompt(n, i) for i, n in enumerate(lengths)])
    for lc in s.cache.layers:
        for b, n in enumerate(lengths):
            cap = n // 2
            assert lc.lengths[b].tolist() == [cap] * lc.kv_heads
            for h in range(lc.kv_heads):
                pos = lc.pos[b, h, :cap].tolist()
                assert pos == sorted(set(pos)) and all(0 <= x < n for x in pos)
                assert pos[-4:] == list(range(n - 4, n)), "the observation window is always kept"
    # the next token is appended at position N (original positions, not the compressed length)
    eng.decode(s, s.logits.argmax(-1))
    for lc in s.cache.layers:
        for b, n in enumerate(lengths):
            assert lc.pos[b, :, n // 2].tolist() == [n] * lc.kv_heads


def test_engine_kept_set_equals_prefill_top_k(tiny_random_model):
    """In the engine, each layer keeps the top-k of the votes computed from that layer's real q/k."""
    eng = mpckv.Engine(tiny_random_model, "snapkv", budget=12, window=4, kernel_size=3)
    seen = {}

    class Spy(SnapKV):
        def on_prefill(self, ctx):
            seen[ctx.layer] = (ctx.q.clone(), ctx.cache.keys().clone())
            super().on_prefill(ctx)

    spy = Spy(budget=12, window=4, kernel_size=3)
    s = mpckv.Engine(tiny_random_model, spy).prefill([prompt(26, 5)])
    s2 = eng.prefill([prompt(26, 5)])
    for layer, (q, k) in seen.items():
        want, margins = naive_snapkv_keep(q, k, [26], 12, 4, 3, "max", "mean", tiny_random_model.scale)
        assert clear_cut(margins)
        assert cache_keep(s.cache[layer]) == want == cache_keep(s2.cache[layer])


# ---------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("kernel", "pooling", "reduce"),
    [(7, "max", "mean"), (5, "avg", "mean"), (3, "max", "max"), (3, "avg", "max"), (1, "max", "sum")],
)
def test_kept_set_equals_naive_reference(kernel, pooling, reduce):
    lengths, cap, window = [26, 19, 9], 10, 4
    ctx, q, k = make_ctx(lengths, seed=kernel)
    SnapKV(budget=cap, window=window, kernel_size=kernel, pooling=pooling, group_reduce=reduce).on_prefill(
        ctx
    )
    want, margins = naive_snapkv_keep(q, k, lengths, cap, window, kernel, pooling, reduce, ctx.scale)
    assert clear_cut(margins), "reference cut too close to a tie for a fp32 comparison"
    assert cache_keep(ctx.cache) == want
    assert ctx.cache.lengths.tolist() == [[10, 10], [10, 10], [9, 9]]


def test_kernel_size_one_keeps_argmax_vote():
    for seed in range(3):
        ctx, q, k = make_ctx([30, 30], seed=seed, q_scale=3.0)
        votes = window_votes(ctx, 6)[:, :, :24]
        SnapKV(budget=7, window=6, kernel_size=1).on_prefill(ctx)
        kept = cache_keep(ctx.cache)
        for (b, h), pos in kept.items():
            assert int(votes[b, h].argmax()) in pos
            assert len(pos) == 7


def test_gqa_group_mean_equals_per_query_head_mean():
    ctx, q, k = make_ctx([22, 15], heads=6, kv_heads=2)
    per_head = window_votes(ctx, 5, per_query_head=True)  # [B, H, L]
    fused = window_votes(ctx, 5, group_reduce="mean")
    torch.testing.assert_close(fused, per_head.view(2, 2, 3, -1).mean(2), atol=1e-6, rtol=1e-5)
    # per query head: the naive explicit softmax votes
    for b, n in enumerate([22, 15]):
        for h in range(6):
            ref = naive_head_votes(q[b, h], k[b, h // 3], n, 5, ctx.scale)
            torch.testing.assert_close(per_head[b, h, : n - 5], torch.tensor(ref), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pool_scores_match_torch_pool(pooling):
    x = torch.rand(3, 2, 20)
    lengths = torch.tensor([[20, 12], [7, 20], [1, 3]])
    got = pool_scores(x, 5, pooling, lengths)
    for i in range(3):
        for j in range(2):
            n = int(lengths[i, j])
            row = x[i, j, :n][None, None]
            if pooling == "max":
                ref = F.max_pool1d(row, 5, stride=1, padding=2)
            else:
                ref = F.avg_pool1d(row, 5, stride=1, padding=2, count_include_pad=True)
            torch.testing.assert_close(got[i, j, :n], ref[0, 0])


def test_short_prompts_untouched_and_small_capacity():
    ctx, _, _ = make_ctx([12, 9])
    before = ctx.cache.k.clone()
    SnapKV(budget=12, window=4).on_prefill(ctx)
    assert ctx.cache.version == 0 and torch.equal(ctx.cache.k, before)
    # capacity below the window: the last C tokens
    ctx, _, _ = make_ctx([12, 9])
    SnapKV(budget=3, window=4).on_prefill(ctx)
    assert cache_keep(ctx.cache) == {
        (0, 0): [9, 10, 11],
        (0, 1): [9, 10, 11],
        (1, 0): [6, 7, 8],
        (1, 1): [6, 7, 8],
    }


def test_per_head_budget_and_order_invariance():
    ctx, q, _ = make_ctx([24, 20])
    SnapKV(budget=[[6, 9], [6, 9], [6, 9]], window=3, kernel_size=3).on_prefill(ctx)
    assert ctx.cache.lengths.tolist() == [[6, 9], [6, 9]]
    # attention over the compressed cache does not depend on the order of the kept entries
    c = ctx.cache
    k, v, lens = c.keys(), c.values(), c.lengths
    perm = torch.stack(
        [torch.cat([torch.randperm(int(n)), torch.arange(int(n), k.shape[2])]) for n in lens.flatten()]
    ).view(2, 2, -1)
    kp = torch.gather(k, 2, perm[..., None].expand_as(k))
    vp = torch.gather(v, 2, perm[..., None].expand_as(v))
    out, _ = cache_attention(q[:, :, -1], k, v, lens, ctx.scale)
    outp, _ = cache_attention(q[:, :, -1], kp, vp, lens, ctx.scale)
    torch.testing.assert_close(out, outp, atol=1e-6, rtol=1e-5)


def test_validation():
    with pytest.raises(ConfigError):
        SnapKV(kernel_size=4)
    with pytest.raises(ConfigError):
        SnapKV(pooling="median")
    with pytest.raises(ConfigError):
        SnapKV(group_reduce="min")
    with pytest.raises(ConfigError):
        SnapKV(window=0)
