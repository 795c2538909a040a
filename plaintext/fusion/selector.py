"""The selector interface that fusion methods implement, and the two baselines (full, concat).

A fusion method is a registered :class:`~mpckv.plaintext.methods.base.KVMethod` of family ``"fusion"``
carrying its hyper-parameters. The recompute driver (:mod:`mpckv.plaintext.fusion.recompute`) asks it,
once per request, which *cached* rows to recompute:

* dynamic selectors (CacheBlend, A³, KVShare) implement :meth:`FusionMethod.choose` and see fresh Q/K/V of
  every row at the check layer (layer ``full_layers``, after ``full_layers`` fully recomputed layers);
* static selectors (EPIC) implement :meth:`FusionMethod.static_rows` and need no check layer.

Rows that are not cached (raw segments, the question) are always recomputed; they are added by the driver
and are outside the budget. As ordinary engine methods (``Engine(model, "cacheblend").prefill(ids)``) fusion
methods do nothing: a plain prefill has no cached rows, so it is dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import AssembledPrompt
from mpckv.plaintext.methods.base import KVMethod

MASKS = ("causal", "bottom_right")


@dataclass
class SelectInput:
    """What a dynamic selector sees at the check layer (batch of one request)."""

    layer: int
    q: torch.Tensor  # [H, N, d] fresh post-RoPE queries of every row
    k: torch.Tensor  # [Hk, N, d] fresh post-RoPE keys
    v: torch.Tensor  # [Hk, N, d] fresh values
    k_old: torch.Tensor  # [Hk, N, d] re-rotated cached keys (zeros on raw rows)
    v_old: torch.Tensor  # [Hk, N, d]
    prompt: AssembledPrompt
    budget: int  # how many cached rows to pick
    scale: float
    config: ModelConfig

    @property
    def cached(self) -> torch.Tensor:
        return self.prompt.cached


@dataclass(kw_only=True)
class FusionMethod(KVMethod):
    """Base of the fusion selectors.

    Parameters
    ----------
    ratio:
        Recompute ratio ``r``: ``floor(r · cached rows)`` cached rows are recomputed (CacheBlend default
        0.15); raw rows come on top.
    full_layers:
        Leading layers recomputed for every row; the check layer is the next one (default 1, CacheBlend).
    mask:
        ``"causal"`` (a recomputed row at position ``p`` sees keys at positions ``<= p``, exact) or
        ``"bottom_right"`` (the official CacheBlend kernels' alignment: row ``i`` of ``S`` sees keys
        ``<= N - |S| + i``; kept for comparison only).
    check_writeback:
        Write the check layer's fresh K/V of *every* row to the cache (CacheBlend). ``False`` keeps cached
        K/V on unselected rows there too (needed for the ``ratio = 0`` ⇒ concatenation oracle).
    """

    ratio: float = 0.15
    full_layers: int = 1
    mask: str = "causal"
    check_writeback: bool = True

    family: ClassVar[str] = "fusion"
    static: ClassVar[bool] = False
    secure_note: ClassVar[str] = (
        "no secure path: chunk caches are stored and re-rotated in plaintext (a shared store of secret "
        "shares is not designed yet)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ConfigError(f"{self.name}: ratio must lie in [0, 1], got {self.ratio}")
        if int(self.full_layers) < 0:
            raise ConfigError(f"{self.name}: full_layers must be >= 0, got {self.full_layers}")
        if self.mask not in MASKS:
            raise ConfigError(f"{self.name}: mask must be one of {MASKS}, got {self.mask!r}")

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        if self.full_layers > config.num_hidden_layers:
            raise ConfigError(
                f"{self.name}: full_layers={self.full_layers} exceeds the model's {config.num_hidden_layers}"
            )

    def budget_for(self, num_cached: int) -> int:
        return min(num_cached, math.floor(float(self.ratio) * num_cached + 1e-9))

    def choose(self, inp: SelectInput) -> torch.Tensor:
        """Indices (into ``0..N-1``) of cached rows to recompute; at most ``inp.budget`` of them."""
        raise NotImplementedError

    def static_rows(self, prompt: AssembledPrompt) -> torch.Tensor:
        """Static selectors: indices of cached rows to recompute, known before the forward pass."""
        raise NotImplementedError


def top_cached(scores: torch.Tensor, cached: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring cached rows (ties to the lower index), sorted ascending."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    from mpckv.plaintext.methods.topk import select_topk

    idx, valid = select_topk(
        scores.float()[None], torch.tensor([k], device=scores.device), invalid=~cached[None]
    )
    return idx[0][valid[0]].sort().values


@dataclass(kw_only=True)
class Concat(FusionMethod):
    """Baseline: plain concatenation of re-rotated chunk caches (PromptCache-style full reuse); only raw
    rows are computed. Not registered (``fusion="concat"``)."""

    ratio: float = 0.0
    full_layers: int = 0
    check_writeback: bool = False
    static: ClassVar[bool] = True
    name: ClassVar[str] = "concat"

    def static_rows(self, prompt: AssembledPrompt) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long, device=prompt.ids.device)
