"""KVShare's cache-hit-aware scheduler and the batch-serving simulator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion.scheduler import (
    BatchCost,
    FCFSScheduler,
    HitRateScheduler,
    Request,
    request_hit_rate,
    simulate,
    synthetic_trace,
)
from mpckv.plaintext.fusion.store import ChunkKV, ChunkKVStore

HITS = st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]), min_size=1, max_size=20)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(HITS, st.integers(1, 6))
def test_order_non_increasing_and_stable(hits, cap):
    queue = [Request(i, float(i), 100, h) for i, h in enumerate(hits)]
    order = HitRateScheduler(capacity=cap).order(queue, now=100.0)
    assert [r.hit_rate for r in order] == sorted(hits, reverse=True)
    for a, b in zip(order, order[1:], strict=False):
        if a.hit_rate == b.hit_rate:
            assert a.arrival < b.arrival  # ties keep arrival order
    batch = HitRateScheduler(capacity=cap).next_batch(queue, 100.0)
    assert batch == order[:cap]


def test_age_bonus_and_fcfs():
    q = [Request(0, 0.0, 10, 0.1), Request(1, 9.0, 10, 0.5)]
    assert [r.rid for r in HitRateScheduler().order(q, 10.0)] == [1, 0]
    assert [r.rid for r in HitRateScheduler(age_weight=0.1).order(q, 10.0)] == [0, 1]
    assert [r.rid for r in FCFSScheduler().order(q[::-1], 10.0)] == [0, 1]
    with pytest.raises(ConfigError):
        HitRateScheduler(capacity=0)


def test_simulate_reference_and_gain():
    reqs = [Request(0, 0.0, 1000, 0.0), Request(1, 0.0, 1000, 1.0), Request(2, 0.0, 1000, 1.0)]
    cost = BatchCost(fixed=0.0, per_token=1e-3, per_reused=0.0)
    fcfs = simulate(reqs, FCFSScheduler(capacity=2), cost)
    hit = simulate(reqs, HitRateScheduler(capacity=2), cost)
    assert fcfs.ttft == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0})  # [0, 1] then [2] (free: all reused)
    assert hit.ttft == pytest.approx({1: 0.0, 2: 0.0, 0: 1.0})  # the two cheap ones go together first
    trace = synthetic_trace(200, 30.0, seed=1)
    a = simulate(trace, FCFSScheduler(capacity=4)).summary()
    b = simulate(trace, HitRateScheduler(capacity=4)).summary()
    assert b["mean_ttft_s"] < a["mean_ttft_s"] and set(simulate(trace, FCFSScheduler()).ttft) == set(
        range(200)
    )


def test_request_hit_rate_counts_stored_chunk_tokens():
    store = ChunkKVStore("fp")
    ids = (1, 2, 3, 4)
    x = __import__("torch").zeros(1, 1, 4, 1)
    store.put(ChunkKV(store.key(ids), ids, x, x))
    before = store.stats.to_dict()
    assert request_hit_rate(store, [Chunk(ids), Chunk([9, 9, 9, 9]), Raw([5, 6])]) == pytest.approx(0.4)
    assert store.stats.to_dict() == before
