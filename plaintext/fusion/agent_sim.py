"""A simulated multi-turn agent workload on one server: Continuum (TTL pins + program FCFS) against LRU.

Programs arrive (Poisson); each runs turns ``LLM call → tool call → LLM call …``, every turn extending the
program's context. The server runs one LLM call at a time: a prefill of the tokens not in cache and a
decode of the turn's output. A finished turn's context KV goes into a :class:`ChunkKVStore` (memory tier,
byte budget, LRU; one entry per program, sized like its context) driven by the simulated clock:

* ``lru`` (vLLM-like baseline): requests served first come first served, no pins — a turn's KV survives the
  tool call only if other programs' KV did not push it out;
* ``continuum``: the KV is pinned for ``τ*`` (:class:`~mpckv.plaintext.fusion.continuum.TTLPolicy`) from
  the tool's recorded durations; requests of pinned programs go first, then program-level FCFS (by the
  program's first arrival); an expired pin is kept while its program's request waits (lazy expiry); when
  pins alone would exceed the budget, the pins of the most recently arrived programs are dropped first
  (deadlock guard).

A turn *hits* when its program's previous KV is still in memory at admission (then only its new tokens are
prefilled). Reported: mean / p90 job completion time (program finish − program arrival), hit rate (hits /
turns after the first), mean queueing delay, pins dropped. ``Policy(order="fcfs", ttl=0)`` is exactly LRU.

Deviations from the paper: one request at a time (no continuous batching or preemption), a linear +
quadratic prefill cost model instead of measured kernels, synthetic tool durations (log-normal per tool)
instead of SWE-Bench / BFCL traces.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.continuum import TTLPolicy
from mpckv.plaintext.fusion.store import ChunkKV, ChunkKVStore

BYTES_PER_TOKEN = 8  # the stand-in cache tensors hold one fp32 K and one fp32 V element per token


@dataclass(frozen=True)
class Turn:
    new_tokens: int  # tokens appended to the context by this turn (tool output, user message)
    out_tokens: int  # tokens the LLM generates
    tool: str  # the tool called after this turn ("" on the last turn)
    tool_s: float  # its duration


@dataclass(frozen=True)
class Program:
    pid: int
    arrival: float
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Cost:
    """Seconds: prefill ``a·new + b·new·context``, decode ``c`` per output token."""

    a: float = 2e-4
    b: float = 2e-8
    c: float = 0.01

    def prefill(self, new: int, context: int) -> float:
        return self.a * new + self.b * new * context

    def decode(self, out: int) -> float:
        return self.c * out


TOOLS = {"bash": (0.8, 0.6), "search": (2.0, 0.5), "edit": (0.3, 0.4)}  # median s, log-sigma


def synthetic_programs(n: int, rate: float, seed: int = 0, turns: tuple[int, int] = (4, 10)) -> list[Program]:
    """``n`` agent programs, Poisson arrivals at ``rate`` per second (SWE-agent-like shapes, scaled down)."""
    if n < 1 or rate <= 0 or turns[0] < 1 or turns[1] < turns[0]:
        raise ConfigError("synthetic_programs needs n >= 1, rate > 0 and 1 <= min turns <= max turns")
    rng = random.Random(seed)
    t, out = 0.0, []
    names = sorted(TOOLS)
    for pid in range(n):
        t += rng.expovariate(rate)
        k = rng.randint(*turns)
        ts = []
        for j in range(k):
            tool = rng.choice(names) if j < k - 1 else ""
            med, sig = TOOLS.get(tool, (0.0, 0.0))
            dur = med * rng.lognormvariate(0.0, sig) if tool else 0.0
            new = rng.randint(1500, 2500) if j == 0 else rng.randint(200, 800)
            ts.append(Turn(new, rng.randint(30, 120), tool, dur))
        out.append(Program(pid, t, tuple(ts)))
    return out


@dataclass(frozen=True)
class Policy:
    """``order``: ``"fcfs"`` (request arrival) or ``"program"`` (pinned first, then program arrival);
    ``ttl``: ``"auto"`` (Continuum's τ*) or a fixed number of seconds (0 = never pin)."""

    name: str
    order: str = "fcfs"
    ttl: float | str = 0.0

    def __post_init__(self) -> None:
        if self.order not in ("fcfs", "program"):
            raise ConfigError(f"order must be 'fcfs' or 'program', got {self.order!r}")
        if not (self.ttl == "auto" or (isinstance(self.ttl, int | float) and self.ttl >= 0)):
            raise ConfigError(f"ttl must be 'auto' or a number >= 0, got {self.ttl!r}")


LRU = Policy("lru", "fcfs", 0.0)
CONTINUUM = Policy("continuum", "program", "auto")


@dataclass
class SimResult:
    policy: str
    jct: dict[int, float] = field(default_factory=dict)
    hits: int = 0
    lookups: int = 0
    queue_delays: list[float] = field(default_factory=list)
    pins: int = 0
    pins_dropped: int = 0
    trace: list[tuple[float, int, int, bool]] = field(default_factory=list)  # (admit, pid, turn, hit)
    ttls: dict[tuple[int, int], float] = field(default_factory=dict)  # (pid, turn) → τ after that turn

    def summary(self) -> dict[str, Any]:
        vals = sorted(self.jct.values())
        return {
            "policy": self.policy,
            "programs": len(vals),
            "mean_jct_s": round(statistics.mean(vals), 4),
            "p90_jct_s": round(vals[min(len(vals) - 1, int(0.9 * len(vals)))], 4),
            "hit_rate": round(self.hits / self.lookups, 4) if self.lookups else 0.0,
            "mean_queue_s": round(statistics.mean(self.queue_delays), 4) if self.queue_delays else 0.0,
            "pins": self.pins,
            "pins_dropped": self.pins_dropped,
        }


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _entry(store: ChunkKVStore, pid: int, tokens: int) -> ChunkKV:
    ids = (pid,)
    x = torch.zeros(1, 1, tokens, 1)
    return ChunkKV(store.key(ids), ids, x, x.clone())


def simulate(
    programs: Sequence[Program], policy: Policy, memory_tokens: int, cost: Cost | None = None
) -> SimResult:
    """Run the workload under ``policy`` with a KV memory of ``memory_tokens`` tokens."""
    cost = cost or Cost()
    clock = _Clock()
    store = ChunkKVStore("agent-sim", memory_bytes=memory_tokens * BYTES_PER_TOKEN, clock=clock)
    ttl = TTLPolicy(fixed=None if policy.ttl == "auto" else float(policy.ttl))
    res = SimResult(policy.name)
    first = {p.pid: p.arrival for p in programs}
    by_id = {p.pid: p for p in programs}
    context = {p.pid: 0 for p in programs}
    finished_at: dict[int, float] = {}
    # events (time, kind, pid, turn): kind 0 = the running turn finishes (before arrivals at the same time)
    events: list[tuple[float, int, int, int]] = [(p.arrival, 1, p.pid, 0) for p in programs]
    heapq.heapify(events)
    queue: list[tuple[float, int, int]] = []  # (arrival, pid, turn)
    busy = False
    while events:
        t, kind, pid, turn = heapq.heappop(events)
        clock.now = t
        key = store.key((pid,))
        prog = by_id[pid]
        if kind == 1:  # arrival of a turn
            if turn > 0:
                ttl.record_tool(prog.turns[turn - 1].tool, t - finished_at[pid])
                if store.pinned(key):  # lazy expiry: keep the pin while the request waits
                    store.pin(key, float("inf"))
            queue.append((t, pid, turn))
        else:  # the running turn finished: its KV returns to the store (pinned for τ*)
            busy = False
            tr = prog.turns[turn]
            if turn == len(prog.turns) - 1:
                res.jct[pid] = t - prog.arrival
            else:
                finished_at[pid] = t
                heapq.heappush(events, (t + tr.tool_s, 1, pid, turn + 1))
                tau = ttl.ttl(tr.tool, cost.prefill(context[pid], context[pid]))
                entry = _entry(store, pid, context[pid])
                if entry.nbytes > store.memory_bytes:
                    tau = 0.0  # larger than the whole memory: never kept, so never pinned
                res.ttls[(pid, turn)] = tau
                if tau > 0:
                    res.pins += 1
                    res.pins_dropped += _make_room(store, entry.nbytes, first)
                store.put(entry, ttl_s=tau if tau > 0 else None)
        if busy or not queue or (events and events[0][0] <= t):
            continue  # schedule once every event of this instant is in
        if policy.order == "fcfs":
            queue.sort(key=lambda r: (r[0], r[1]))
        else:
            queue.sort(key=lambda r: (not store.pinned(store.key((r[1],))), first[r[1]], r[0]))
        arrival, pid, turn = queue.pop(0)
        key = store.key((pid,))
        tr = by_id[pid].turns[turn]
        hit = False
        if turn > 0:
            res.lookups += 1
            hit = store.in_memory(key)
            res.hits += int(hit)
        store.unpin(key)
        store.evict(key)  # the running request holds its KV; it returns to the store when the turn ends
        new = tr.new_tokens + (0 if hit or turn == 0 else context[pid])
        ctx = context[pid] + tr.new_tokens
        res.queue_delays.append(t - arrival)
        ttl.record_queue_delay(t - arrival)
        res.trace.append((t, pid, turn, hit))
        context[pid] = ctx + tr.out_tokens
        busy = True
        heapq.heappush(events, (t + cost.prefill(new, ctx) + cost.decode(tr.out_tokens), 0, pid, turn))
    return res


def _make_room(store: ChunkKVStore, need: int, first: dict[int, float]) -> int:
    """Deadlock guard: unpin the latest-arrived programs until pins leave room for ``need`` bytes."""
    dropped = 0
    pinned = sorted(
        (pid for pid in first if store.pinned(store.key((pid,))) and store.in_memory(store.key((pid,)))),
        key=lambda p: -first[p],
    )
    for pid in pinned:
        if store.pinned_bytes() + need <= store.memory_bytes:
            break
        store.unpin(store.key((pid,)))
        dropped += 1
    return dropped


def compare(
    programs: Sequence[Program], memory_tokens: int, cost: Cost | None = None
) -> list[dict[str, Any]]:
    """LRU and Continuum on the same workload (summaries, LRU first)."""
    return [simulate(programs, p, memory_tokens, cost).summary() for p in (LRU, CONTINUUM)]
