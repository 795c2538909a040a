"""Optional wall-clock timers for the parts of a decode step (a no-op unless a timer is attached).

``Engine.timers = PhaseTimer(device)`` makes :meth:`mpckv.plaintext.engine.Engine.decode` add the time of
each part of every layer to named totals: ``qkv`` (norm + q/k/v projections + RoPE), ``method`` (the
method's hooks: scoring, selection, eviction), ``append`` (writing the new K/V), ``gather`` (copying the
selected entries), ``attention`` (the decode attention itself), ``finish`` (o-projection + MLP) and
``head`` (embedding + final norm + logits). On CUDA every span synchronises the device first, so timing
slows a GPU run down; leave the timer off outside benchmarks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

#: The parts a decode step is split into; ``attention_parts`` are the KV-method-dependent ones.
PARTS = ("qkv", "method", "append", "gather", "attention", "finish", "head")
ATTENTION_PARTS = ("method", "append", "gather", "attention")


class PhaseTimer:
    """Accumulates seconds per named part; :meth:`snapshot` / :meth:`reset` between decode steps."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = dict.fromkeys(PARTS, 0.0)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``name``."""
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.totals = dict.fromkeys(PARTS, 0.0)

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


_NULL = contextlib.nullcontext()


def span(timer: PhaseTimer | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``timer.span(name)``, or a shared no-op context when ``timer`` is ``None``."""
    return _NULL if timer is None else timer.span(name)
