"""The shared dense prefill (``Engine.record_prefill`` / ``Engine.prefill_from``): replaying a method's
prefill hooks on a recorded dense prefill must give exactly what the method's own ``Engine.prefill`` gives.

Oracle: for every registered method (and a composition), on a ragged batch with small budgets, the replayed
session has the same cache (K, V, positions, lengths, metadata), the same logits, and the same greedy tokens
and logits over several decode steps — and replaying twice from one record gives the same again (the
record is not consumed).
"""

from __future__ import annotations

import pytest
import torch
from test_universal_oracles import OVERRIDES

import mpckv
from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import KVMethod
from mpckv.registry import list_methods, method_class

METHODS = [m.name for m in list_methods()]
NEW = 5


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in (44, 29)]


def _engine(model, name, budget):
    params = dict(OVERRIDES.get(name, {}))
    if name != "dense" and "+" not in name:
        params["budget"] = budget
    return mpckv.Engine(model, name, **params) if params else mpckv.Engine(model, name)


def _assert_same_cache(a, b):
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        assert torch.equal(la.lengths, lb.lengths)
        n = la.max_length
        assert torch.equal(la.keys(), lb.keys()) and torch.equal(la.values(), lb.values())
        assert torch.equal(la.positions(), lb.positions())
        assert la.meta.keys() == lb.meta.keys()
        for key in la.meta:
            assert torch.equal(la.meta[key][:, :, :n], lb.meta[key][:, :, :n]), key


def _run(engine, session):
    toks, logits = [], [session.logits.clone()]
    for _ in range(NEW):
        tok = session.logits.argmax(-1)
        toks.append(tok)
        logits.append(engine.decode(session, tok).clone())
    return torch.stack(toks), torch.stack(logits)


@pytest.fixture(scope="module")
def record(tiny_random_model):
    return mpckv.Engine(tiny_random_model).record_prefill(_prompts())


@pytest.mark.parametrize("budget", [0.3, 12])
@pytest.mark.parametrize("name", METHODS)
def test_replay_equals_prefill(name, budget, tiny_random_model, record):
    eng = _engine(tiny_random_model, name, budget)
    own = eng.prefill(_prompts())
    replay = eng.prefill_from(record)
    assert torch.equal(own.logits, replay.logits)
    assert torch.equal(own.prompt_lengths, replay.prompt_lengths)
    _assert_same_cache(own, replay)
    t_own, l_own = _run(eng, own)
    t_rep, l_rep = _run(eng, replay)
    assert torch.equal(t_own, t_rep) and torch.equal(l_own, l_rep)
    _assert_same_cache(own, replay)
    # the record is untouched: a second replay is identical to the first
    again = eng.prefill_from(record)
    assert torch.equal(_run(eng, again)[1], l_rep)


def test_replay_composition(tiny_random_model, record):
    eng = mpckv.Engine(tiny_random_model, "snapkv+quest")
    own, replay = eng.prefill(_prompts()), eng.prefill_from(record)
    _assert_same_cache(own, replay)
    assert torch.equal(_run(eng, own)[1], _run(eng, replay)[1])


def test_record_matches_dense_prefill(tiny_random_model, record):
    dense = mpckv.Engine(tiny_random_model).prefill(_prompts())
    assert torch.equal(dense.logits, record.logits) and record.batch == 2
    for layer, lc in enumerate(dense.cache.layers):
        t = lc.max_length
        assert torch.equal(lc.keys(), record.keys[layer][:, :, :t])


def test_changes_prefill_is_refused(tiny_random_model, record):
    class Reshaper(KVMethod):
        name = "reshaper"
        changes_prefill = True

    eng = mpckv.Engine(tiny_random_model, Reshaper())
    with pytest.raises(ConfigError, match="changes the prefill"):
        eng.prefill_from(record)
    assert not any(method_class(m).changes_prefill for m in METHODS)  # today every method shares


def test_budget_independent_scores_computed_once(tiny_random_model, monkeypatch):
    """H2O's all-query column sums (and MiKV's, which are H2O's) are computed once per layer and record and
    reused by the other budgets; an engine's own prefill (no record) never uses the memo."""
    from mpckv.plaintext.methods import column_scores

    calls = []
    real = column_scores.causal_column_sums

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(column_scores, "causal_column_sums", counting)
    rec = mpckv.Engine(tiny_random_model).record_prefill(_prompts())
    layers = tiny_random_model.config.num_hidden_layers
    for name, budget in [("h2o", 0.3), ("h2o", 12), ("mikv", 0.3)]:
        _engine(tiny_random_model, name, budget).prefill_from(rec)
    assert len(calls) == layers
    assert sorted(rec.memo) == [(layer, "all_query_votes") for layer in range(layers)]
    _engine(tiny_random_model, "h2o", 0.3).prefill(_prompts())
    assert len(calls) == 2 * layers
