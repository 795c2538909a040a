"""CacheBlend: recompute the cached tokens whose values deviate most from a fresh computation.

Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge Fusion",
EuroSys 2025, arXiv 2405.16444 (official code: YaoJiayi/CacheBlend; LMCache ``blend``).

At the check layer (layer 1 after one fully recomputed layer, as in the official code) the deviation of
cached row ``j`` is ``Δ_j = Σ_{h,e} (V_fresh[j,h,e] − V_cached[j,h,e])²`` and the ``floor(r · N_cached)``
rows with the largest ``Δ`` are recomputed in every later layer; raw rows (the question) always are.

Deviations from the paper: a single selection at the check layer (the paper's "gradual filtering" across
layers is not implemented, matching the official code); exact per-position causal masks by default (the
official kernels align the selected queries bottom-right, available as ``mask="bottom_right"``); no
loading controller (the ratio is fixed by the caller); ``score="k"`` ranks by the post-RoPE key deviation
instead (LMCache v1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.selector import FusionMethod, SelectInput, top_cached
from mpckv.registry import register_method


def value_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """``[Hk, N, d]`` pair → per-row squared L2 deviation ``[N]`` in fp32."""
    return (fresh.float() - cached.float()).pow(2).sum(dim=(0, 2))


@register_method("cacheblend")
@dataclass(kw_only=True)
class CacheBlend(FusionMethod):
    """CacheBlend (fusion): recompute the top-r cached rows by value deviation at the check layer."""

    score: str = "v"

    paper: ClassVar[str] = "arXiv 2405.16444"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in ("v", "k"):
            raise ConfigError(f"cacheblend: score must be 'v' or 'k', got {self.score!r}")

    def choose(self, inp: SelectInput) -> torch.Tensor:
        fresh, old = (inp.v, inp.v_old) if self.score == "v" else (inp.k, inp.k_old)
        dev = value_deviation(fresh, old)
        return top_cached(dev, inp.cached, inp.budget)
