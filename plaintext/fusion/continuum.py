"""Continuum's time-to-live rule: how long to pin a finished agent turn's KV cache.

Li et al., "Continuum: Efficient and Robust Multi-Turn LLM Agent Scheduling with KV Cache Time-to-Live",
arXiv 2511.02230. When an agent turn ends in a tool call ``f``, keeping its KV for ``τ`` seconds costs
``τ`` (memory held, in units where the request's size cancels) and saves ``B = 𝒯·η + PrefillReload`` (the
queueing delay a re-queued turn pays plus the prefill/reload of its context) if the next turn arrives
within ``τ``. With ``P(τ, f)`` the empirical CDF of the recorded durations of ``f``::

    τ* = argmax_{τ ∈ {0} ∪ samples}  P(τ, f) · B − τ       (ties → the smaller τ)

Cold start: per-tool CDF once ``f`` has more than ``K`` samples, else the CDF of all tools once there are
more than ``K``, else ``ln B`` (the optimum for Exp(1) durations; 0 when ``B ≤ 1``). ``𝒯`` is the running
mean queueing delay, ``η = 1`` (the paper's setting).

Deviations: time is seconds of a simulated clock (:mod:`mpckv.plaintext.fusion.agent_sim`), not the
engine's; ``fixed`` gives a static TTL for ablations (``fixed = 0`` never pins ⇒ plain LRU).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mpckv.errors import ConfigError


def ttl_choice(samples: Sequence[float], benefit: float) -> float:
    """``τ*`` over the candidates ``{0} ∪ samples`` (see the module docstring)."""
    if not samples:
        return 0.0
    xs = sorted(float(s) for s in samples)
    n = len(xs)
    best, best_val = 0.0, 0.0
    for tau in sorted(set(xs)):
        p = bisect.bisect_right(xs, tau) / n
        val = p * benefit - tau
        if val > best_val + 1e-12:
            best, best_val = tau, val
    return best


@dataclass
class TTLPolicy:
    """Per-tool duration samples and the running queueing delay; :meth:`ttl` gives ``τ*``."""

    k: int = 100
    eta: float = 1.0
    fixed: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    all_samples: list[float] = field(default_factory=list)
    queue_delay: float = 0.0
    _delays: int = 0

    def __post_init__(self) -> None:
        if self.k < 0 or self.eta < 0 or (self.fixed is not None and self.fixed < 0):
            raise ConfigError("TTLPolicy needs k >= 0, eta >= 0 and fixed >= 0 (or None)")

    def record_tool(self, tool: str, seconds: float) -> None:
        self.samples.setdefault(tool, []).append(float(seconds))
        self.all_samples.append(float(seconds))

    def record_queue_delay(self, seconds: float) -> None:
        self._delays += 1
        self.queue_delay += (float(seconds) - self.queue_delay) / self._delays

    def benefit(self, reload_s: float) -> float:
        return self.queue_delay * self.eta + float(reload_s)

    def ttl(self, tool: str, reload_s: float) -> float:
        """Seconds to pin a turn that ends in ``tool`` and whose context costs ``reload_s`` to rebuild."""
        if self.fixed is not None:
            return float(self.fixed)
        b = self.benefit(reload_s)
        own = self.samples.get(tool, [])
        if len(own) > self.k:
            return ttl_choice(own, b)
        if len(self.all_samples) > self.k:
            return ttl_choice(self.all_samples, b)
        return math.log(b) if b > 1.0 else 0.0
