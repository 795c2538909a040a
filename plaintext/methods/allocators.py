"""Budget allocators: pure functions of public sizes that split a budget over layers.

* uniform — every layer gets the same budget (SnapKV, H2O, Quest, …).
* pyramid — PyramidKV (Cai et al., arXiv 2406.02069): with capacity ``C`` including a window ``w`` and
  ``β`` (default 20), ``min = (C − w)/β``, ``max = 2(C − w) − min``, layer ``l`` of ``L`` gets
  ``max − l·(max − min)/(L − 1)`` plus the window. The mean over layers equals ``C``.
"""

from __future__ import annotations

from mpckv.errors import BudgetError


def pyramid_capacities(capacity: int, window: int, num_layers: int, beta: float = 20.0) -> list[int]:
    """Per-layer capacities (window included) of PyramidKV; the first layer gets the most."""
    if beta <= 0:
        raise BudgetError(f"pyramid beta must be positive, got {beta}")
    if capacity < window:
        raise BudgetError(f"pyramid capacity {capacity} is smaller than the window {window}")
    if num_layers == 1:
        return [capacity]
    avail = capacity - window
    lo = avail / beta
    hi = 2 * avail - lo
    step = (hi - lo) / (num_layers - 1)
    return [window + int(hi - layer * step) for layer in range(num_layers)]
