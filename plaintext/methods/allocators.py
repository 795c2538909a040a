"""Budget allocators: pure functions of public sizes that split a budget over layers.

* uniform — every layer gets the same budget (SnapKV, H2O, Quest, …).
* pyramid — PyramidKV (Cai et al., arXiv 2406.02069, official code ``Zefan-Cai/PyramidKV``
  ``pyramidkv_utils.py``; kvpress ``PyramidKVPress``): with capacity ``C`` including a window ``w``,
  ``A = C − w`` and ``β`` (default 20), ``min = A/β``, ``max = 2A − min``; when ``max`` exceeds the prompt
  prefix (``max ≥ N − w``) it is clamped to ``N − w`` and ``min = 2A − max`` keeps the mean. Layer ``l`` of
  ``L`` gets ``max − l·(max − min)/(L − 1)`` prefix entries plus the window. The mean over layers is ``C``.
"""

from __future__ import annotations

from fractions import Fraction

from mpckv.budget import Budget
from mpckv.errors import BudgetError


def pyramid_capacities(
    capacity: int,
    window: int,
    num_layers: int,
    beta: float = 20.0,
    prompt_len: int | None = None,
) -> list[int]:
    """Per-layer capacities (window included) of PyramidKV; the first layer gets the most.

    Parameters
    ----------
    capacity:
        Average capacity ``C`` per layer, window included.
    window:
        Observation window ``w`` (always kept, part of every layer's capacity).
    num_layers:
        Number of decoder layers ``L``.
    beta:
        Pyramid steepness ``β > 0`` (paper/official default 20): the top layer keeps ``(C − w)/β``.
    prompt_len:
        Prompt length ``N``. When given and ``max ≥ N − w``, ``max`` is clamped to ``N − w`` and ``min``
        raised to ``2(C − w) − max`` (official code). Prompts with ``N ≤ C`` are kept whole (every layer
        gets ``N``).

    Returns
    -------
    list[int]
        ``L`` capacities, non-increasing. Exact rational arithmetic with round-half-even: the values are
        symmetric around ``C`` so their mean is exactly ``C`` (for ``N > C``).

    Notes
    -----
    The official code uses integer division (``min = A // β``, ``steps = (max − min) // (L − 1)``), which
    makes the mean overshoot ``C`` (up to doubling it when ``max − min < L − 1``), and keeps a uniform
    SnapKV budget for ``C ≤ N < 2(C − w)``. We use kvpress's real-valued formula with the clamp for every
    ``N > C``, which is continuous in ``N`` (the pyramid flattens to uniform as ``N → C``).
    """
    if beta <= 0:
        raise BudgetError(f"pyramid beta must be positive, got {beta}")
    if num_layers < 1:
        raise BudgetError(f"pyramid needs at least one layer, got {num_layers}")
    if window < 0:
        raise BudgetError(f"pyramid window must be >= 0, got {window}")
    if capacity < window:
        raise BudgetError(f"pyramid capacity {capacity} is smaller than the window {window}")
    if prompt_len is not None and prompt_len <= capacity:
        return [prompt_len] * num_layers
    if num_layers == 1:
        return [capacity]
    avail = Fraction(capacity - window)
    lo = avail / Fraction(beta)
    hi = 2 * avail - lo
    if prompt_len is not None and hi >= prompt_len - window:
        hi = Fraction(prompt_len - window)
        lo = 2 * avail - hi
    step = (hi - lo) / (num_layers - 1)
    return [window + round(hi - layer * step) for layer in range(num_layers)]


def budget_entry_tokens(budget: Budget, n: int, layer: int = 0, head: int = 0) -> int:
    """Tokens of ``budget`` for ``(layer, head)`` at prompt length ``n``, *not* clamped to ``n``.

    A ratio entry gives ``floor(r·n)`` (at least 1, as :meth:`Budget.tokens_for`); a token entry is returned
    as is, so decode-time methods (H2O) can hold more entries than the prompt had.
    """
    if budget.kind in ("ratio", "tokens"):
        raw = budget.value
    elif budget.kind == "per_layer":
        raw = budget.value[layer]
    else:
        raw = budget.value[layer][head]
    if isinstance(raw, int):
        return raw
    return budget.tokens_for(n, layer, head)
