"""Oracles every registered method must pass (DESIGN.md, "Universal oracles").

The matrix is built from the registry, so a new method is tested as soon as it registers. ``OVERRIDES``
holds small-size hyper-parameters so that methods actually compress at test sizes.
"""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv.registry import list_methods

OVERRIDES: dict[str, dict] = {
    "snapkv": {"window": 4},
    "pyramidkv": {"window": 4},
    "h2o_window": {"window": 4},
    "quest": {"page_size": 4, "skip_layers": 1},
    "streamingllm": {"sinks": 2},
    "razorattention": {"heads": [[0, 1], [2, 0]], "sinks": 2},
    "keyformer": {"max_new_tokens": 8},
    "windowkv": {"window_size": 4, "suffix": 4, "group_size": 2},
    "trimkv": {"gates": "constant", "buffer_size": 4, "sinks": 1},
    # static eviction off so that a full budget really is dense; tests/methods/test_mpcache.py covers it
    "mpcache": {"static_ratio": 1.0, "cluster_sizes": [8, 4], "dense_layers": [0]},
}
METHODS = [m.name for m in list_methods()]
N, NEW = 48, 6


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, name, budget):
    params = dict(OVERRIDES.get(name, {}))
    if name != "dense":
        params["budget"] = budget
    return mpckv.Engine(model, name, **params)


def test_expected_methods_registered():
    assert {"dense", "streamingllm", "h2o", "h2o_window", "snapkv", "pyramidkv", "quest", "mpcache"} <= set(
        METHODS
    )


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_is_dense(name, tiny_random_model):
    p = _prompt(N)
    dense_eng = mpckv.Engine(tiny_random_model)
    eng = _engine(tiny_random_model, name, N + NEW + 4)
    ds, ms = dense_eng.prefill([p]), eng.prefill([p])
    torch.testing.assert_close(ms.logits, ds.logits, atol=1e-5, rtol=1e-5)
    for _t in range(NEW):
        tok = ds.logits.argmax(-1)
        torch.testing.assert_close(eng.decode(ms, tok), dense_eng.decode(ds, tok), atol=1e-5, rtol=1e-5)
    assert ms.cache.mean_lengths() == ds.cache.mean_lengths()


@pytest.mark.parametrize("name", METHODS)
def test_kept_entries_are_valid(name, tiny_random_model):
    """Kept positions are unique, in range, and the cache never grows beyond dense."""
    eng = _engine(tiny_random_model, name, 0.25)
    s = eng.prefill([_prompt(N), _prompt(N - 17, 1)])
    for _t in range(NEW):
        eng.decode(s, s.logits.argmax(-1))
        assert s.dense_lengths is not None
        for lc in s.cache.layers:
            # GQA: the cache holds one row per KV head, never one per query head
            assert lc.k.shape[1] == lc.v.shape[1] == tiny_random_model.config.num_key_value_heads
            for b in range(2):
                limit = int(s.dense_lengths[b])
                for h in range(lc.kv_heads):
                    pos = lc.pos[b, h, : int(lc.lengths[b, h])].tolist()
                    assert len(set(pos)) == len(pos), (name, b, h)
                    assert all(0 <= x < limit for x in pos)
                    assert len(pos) <= limit
                    assert limit - 1 in pos, "the newest token must be in the cache"


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_single_and_deterministic(name, tiny_random_model):
    eng = _engine(tiny_random_model, name, 0.3)
    prompts = [_prompt(N, 3), _prompt(29, 4)]
    both = eng.generate(prompts, NEW, stop_tokens=[])
    again = eng.generate(prompts, NEW, stop_tokens=[])
    assert both.tokens == again.tokens
    for i, p in enumerate(prompts):
        assert eng.generate([p], NEW, stop_tokens=[]).tokens[0] == both.tokens[i], name


# fusion methods act only in Engine.prefill_segments (tests/fusion/); a plain prefill is dense for them
COMPRESSING = [m.name for m in list_methods() if m.name != "dense" and m.family != "fusion"]


@pytest.mark.parametrize("name", COMPRESSING)
def test_compresses_at_small_budget(name, tiny_random_model):
    """At a 25 % budget a method stores or reads fewer entries than dense, or stores them in fewer bytes
    (storage formats: channel-pruned, quantized)."""
    res = _engine(tiny_random_model, name, 0.25).generate([_prompt(N)], NEW, stop_tokens=[])
    dense = mpckv.Engine(tiny_random_model).generate([_prompt(N)], NEW, stop_tokens=[])
    stored = sum(res.stats.kept_per_layer) < sum(dense.stats.kept_per_layer)
    read = sum(res.stats.read_per_layer) < sum(dense.stats.read_per_layer)
    smaller = res.stats.live_cache_bytes < dense.stats.live_cache_bytes
    assert stored or read or smaller
