"""Continuum's TTL rule and the simulated agent workload (the card's oracles)."""

from __future__ import annotations

import math
import random
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.agent_sim import (
    BYTES_PER_TOKEN,
    CONTINUUM,
    LRU,
    Cost,
    Policy,
    simulate,
    synthetic_programs,
)
from mpckv.plaintext.fusion.continuum import TTLPolicy, ttl_choice

SAMPLES = st.lists(st.floats(0.01, 50.0), min_size=1, max_size=30)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(SAMPLES, st.floats(0.0, 100.0))
def test_ttl_choice_is_the_argmax_over_candidates(samples, b):
    tau = ttl_choice(samples, b)
    n = len(samples)

    def value(t):
        return sum(s <= t for s in samples) / n * b - t

    assert tau == 0.0 or tau in samples
    best = max([0.0, *samples], key=lambda t: (round(value(t), 9), -t))
    assert value(tau) == pytest.approx(value(best), abs=1e-9)
    if b <= min(samples):
        assert tau == 0.0  # pinning never pays


def test_ttl_choice_constant_samples_and_exponential():
    assert ttl_choice([3.0] * 5, 4.0) == 3.0
    assert ttl_choice([3.0] * 5, 3.0) == 0.0
    rng = random.Random(0)
    xs = [rng.expovariate(1.0) for _ in range(20000)]
    assert ttl_choice(xs, 5.0) == pytest.approx(math.log(5.0), abs=0.08)


def test_ttl_policy_cold_start_and_per_tool():
    p = TTLPolicy(k=3)
    assert p.ttl("bash", 0.5) == 0.0 and p.ttl("bash", math.e) == pytest.approx(1.0)
    for s in (1.0, 1.0, 1.0, 1.0):
        p.record_tool("search", s)
    assert p.ttl("bash", 5.0) == 1.0  # global CDF (4 > k samples), per-tool one too small
    for s in (9.0, 9.0, 9.0, 9.0):
        p.record_tool("bash", s)
    assert p.ttl("bash", 5.0) == 0.0 and p.ttl("bash", 10.0) == 9.0
    p.record_queue_delay(2.0)
    p.record_queue_delay(4.0)
    assert p.benefit(1.0) == pytest.approx(4.0)
    assert TTLPolicy(fixed=2.5).ttl("x", 100.0) == 2.5
    with pytest.raises(ConfigError):
        TTLPolicy(fixed=-1.0)
    with pytest.raises(ConfigError):
        Policy("bad", order="lifo")


def _naive_lru(programs, memory_tokens, cost):
    """Independent reference: FCFS one-at-a-time server, an OrderedDict LRU of program contexts."""
    lru: OrderedDict[int, int] = OrderedDict()
    events = sorted((p.arrival, p.pid, 0) for p in programs)
    by_id = {p.pid: p for p in programs}
    ctx = {p.pid: 0 for p in programs}
    free, trace = 0.0, []
    queue = []
    while events or queue:
        events.sort()
        if not queue or (events and events[0][0] <= free):
            queue.append(events.pop(0))
            continue
        queue.sort()
        arrival, pid, turn = queue.pop(0)
        start = max(free, arrival)
        hit = turn > 0 and pid in lru
        lru.pop(pid, None)
        tr = by_id[pid].turns[turn]
        new = tr.new_tokens + (0 if hit or turn == 0 else ctx[pid])
        c = ctx[pid] + tr.new_tokens
        free = start + cost.prefill(new, c) + cost.decode(tr.out_tokens)
        ctx[pid] = c + tr.out_tokens
        trace.append((pid, turn, hit))
        if turn < len(by_id[pid].turns) - 1:
            events.append((free + tr.tool_s, pid, turn + 1))
            if ctx[pid] <= memory_tokens:
                lru[pid] = ctx[pid]
                while sum(lru.values()) > memory_tokens:
                    lru.popitem(last=False)
    return trace


@pytest.mark.parametrize("memory", [4000, 12000, 10**7])
def test_ttl_zero_is_lru(memory):
    progs = synthetic_programs(25, 0.15, seed=3, turns=(2, 5))
    cost = Cost()
    want = _naive_lru(progs, memory, cost)
    for pol in (LRU, Policy("ttl0", "fcfs", 0.0)):
        got = simulate(progs, pol, memory, cost)
        assert [(p, t, h) for _, p, t, h in got.trace] == want
        assert got.pins == 0
    if memory == 10**7:
        assert all(h for _, t, h in want if t > 0)


def test_continuum_pins_hold_and_order():
    progs = synthetic_programs(40, 0.2, seed=1, turns=(3, 6))
    res = simulate(progs, CONTINUUM, 8000)
    assert res.pins > 0 and len(res.jct) == 40
    by_id = {p.pid: p for p in progs}
    hits = {(p, t): h for _, p, t, h in res.trace}
    if res.pins_dropped == 0:  # a pinned turn whose tool returns within τ always hits
        for (pid, turn), tau in res.ttls.items():
            if tau > 0 and by_id[pid].turns[turn].tool_s <= tau:
                assert hits[(pid, turn + 1)]
    # program FCFS: first turns are admitted in program-arrival order
    firsts = [p for _, p, t, _ in res.trace if t == 0]
    assert firsts == sorted(firsts, key=lambda p: by_id[p].arrival)
    lru = simulate(progs, LRU, 8000)
    assert res.summary()["hit_rate"] >= lru.summary()["hit_rate"]


def test_deadlock_guard_drops_latest_pins():
    progs = synthetic_programs(30, 0.5, seed=2, turns=(3, 4))
    res = simulate(progs, Policy("pin-long", "program", 1000.0), 6000)
    assert res.pins_dropped > 0 and len(res.jct) == 30  # no deadlock: every program finished
    assert BYTES_PER_TOKEN == 8
