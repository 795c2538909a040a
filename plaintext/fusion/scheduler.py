"""KVShare's cache-hit-aware request scheduler, and a small batch-serving simulator to measure it.

Yang et al., "KVShare", arXiv 2503.16525: the waiting queue is sorted by cache hit rate (reused prompt
tokens / prompt tokens, descending) and the continuous batch is filled from the top, so requests of similar
hit rate run together and cheap high-hit requests are not held back by expensive ones. Ties keep arrival
order (the sort is stable).

:func:`request_hit_rate` measures a request's hit rate against a :class:`ChunkKVStore` (token weighted,
without touching the store's statistics or LRU order). :func:`simulate` replays a request trace on one
server that runs one batch at a time, a batch taking as long as its slowest member (padding), so that the
TTFT of the hit-rate order can be compared with first-come-first-served on the same trace.

Deviations: the paper's scheduler sits in vLLM's continuous batching; ours is a batch-at-a-time model with
an explicit cost model (``BatchCost``) instead of measured kernels. ``age_weight`` (priority = hit rate +
``age_weight`` × seconds waited) is our starvation guard (the card's suggestion; 0 = the paper's rule).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import Chunk, as_segments
from mpckv.plaintext.fusion.store import ChunkKVStore


def request_hit_rate(store: ChunkKVStore, segments: Sequence[Any]) -> float:
    """Fraction of the request's tokens that sit in stored chunks (raw segments count as misses)."""
    segs = as_segments(segments)
    total = sum(len(s.token_ids) for s in segs)
    hit = sum(
        len(s.token_ids)
        for s in segs
        if isinstance(s, Chunk) and s.token_ids and store.key(s.token_ids) in store
    )
    return hit / total if total else 0.0


@dataclass(frozen=True)
class Request:
    """One request of a trace: arrival time (s), prompt tokens and hit rate in ``[0, 1]``."""

    rid: int
    arrival: float
    tokens: int
    hit_rate: float


@dataclass
class HitRateScheduler:
    """Order the waiting queue by hit rate (descending, stable) and take the first ``capacity``."""

    capacity: int = 8
    age_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ConfigError(f"scheduler capacity must be >= 1, got {self.capacity}")
        if self.age_weight < 0:
            raise ConfigError(f"age_weight must be >= 0, got {self.age_weight}")

    def order(self, queue: Sequence[Request], now: float) -> list[Request]:
        return sorted(queue, key=lambda r: -(r.hit_rate + self.age_weight * max(0.0, now - r.arrival)))

    def next_batch(self, queue: Sequence[Request], now: float) -> list[Request]:
        return self.order(queue, now)[: self.capacity]


@dataclass
class FCFSScheduler(HitRateScheduler):
    """First come, first served (the baseline)."""

    def order(self, queue: Sequence[Request], now: float) -> list[Request]:
        return sorted(queue, key=lambda r: (r.arrival, r.rid))


@dataclass(frozen=True)
class BatchCost:
    """Seconds per batch: ``fixed + max_i tokens_i · ((1 − h_i) · per_token + h_i · per_reused)``."""

    fixed: float = 0.005
    per_token: float = 2e-4
    per_reused: float = 2e-5

    def __call__(self, batch: Sequence[Request]) -> float:
        worst = max(
            r.tokens * ((1 - r.hit_rate) * self.per_token + r.hit_rate * self.per_reused) for r in batch
        )
        return self.fixed + worst


@dataclass
class ServeResult:
    """TTFT per request (batch end − arrival) and summary numbers."""

    ttft: dict[int, float] = field(default_factory=dict)
    makespan: float = 0.0

    def summary(self) -> dict[str, float]:
        vals = sorted(self.ttft.values())
        p90 = vals[min(len(vals) - 1, int(0.9 * len(vals)))] if vals else 0.0
        return {
            "mean_ttft_s": round(statistics.mean(vals), 5) if vals else 0.0,
            "p90_ttft_s": round(p90, 5),
            "max_ttft_s": round(vals[-1], 5) if vals else 0.0,
            "makespan_s": round(self.makespan, 5),
        }


def simulate(
    requests: Sequence[Request], scheduler: HitRateScheduler, cost: BatchCost | None = None
) -> ServeResult:
    """Replay ``requests`` on one server running one batch at a time (see the module docstring)."""
    cost = cost or BatchCost()
    pending = sorted(requests, key=lambda r: (r.arrival, r.rid))
    queue: list[Request] = []
    now, i = 0.0, 0
    res = ServeResult()
    while i < len(pending) or queue:
        while i < len(pending) and pending[i].arrival <= now:
            queue.append(pending[i])
            i += 1
        if not queue:
            now = pending[i].arrival
            continue
        batch = scheduler.next_batch(queue, now)
        now += cost(batch)
        for r in batch:
            res.ttft[r.rid] = now - r.arrival
            queue.remove(r)
    res.makespan = now
    return res


def synthetic_trace(n: int, rate: float, seed: int = 0, tokens: int = 4000) -> list[Request]:
    """Poisson arrivals at ``rate`` req/s; hit rates drawn from a bimodal mix (shared documents or not)."""
    import random

    if n < 1 or rate <= 0:
        raise ConfigError("a trace needs n >= 1 requests and a positive rate")
    rng = random.Random(seed)
    t, out = 0.0, []
    for rid in range(n):
        t += rng.expovariate(rate)
        h = rng.uniform(0.7, 0.98) if rng.random() < 0.5 else rng.uniform(0.0, 0.3)
        out.append(Request(rid, t, int(tokens * rng.uniform(0.5, 1.5)), h))
    return out
