"""EPIC (LegoLink): recompute the first ``k`` tokens of every chunk but the first — a static selection.

Hu et al., "EPIC: Efficient Position-Independent Caching for Serving Large Language Models",
arXiv 2410.15332 (code: DerekHJH/epic). Each independently prefilled chunk starts with its own attention
sink; recomputing its first ``k`` tokens at their linked positions (plus the new tokens) repairs most of
the damage, with a selection known before the forward pass (data-independent, hence cheap under MPC).

Every layer computes only the selected rows (no fully recomputed leading layer, ``full_layers = 0``).
Chunks shorter than ``k`` are recomputed whole; a chunk at the very start of the prompt keeps its cache
(its sink is the real one).

Deviations: LegoLink-0's dummy sink tokens are, for models with a BOS token, the one BOS every chunk
cache is computed behind (:func:`~mpckv.plaintext.fusion.assemble.sink_prefix`, shared by all fusion
methods) rather than four dummies; ``k`` rows per chunk are recomputed on top. ``ratio`` is unused (the
budget is ``k`` rows per chunk, reported as the realised recompute ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import AssembledPrompt
from mpckv.plaintext.fusion.selector import FusionMethod
from mpckv.registry import register_method


@register_method("epic")
@dataclass(kw_only=True)
class Epic(FusionMethod):
    """EPIC / LegoLink (fusion): recompute the first k tokens of each chunk (static, data-independent)."""

    k: int = 2
    full_layers: int = 0

    paper: ClassVar[str] = "arXiv 2410.15332"
    static: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.k) < 0:
            raise ConfigError(f"epic: k must be >= 0, got {self.k}")

    def static_rows(self, prompt: AssembledPrompt) -> torch.Tensor:
        rows: list[int] = []
        for start, end in prompt.chunk_spans():
            if start == 0:
                continue
            rows.extend(range(start, min(end, start + int(self.k))))
        return torch.tensor(rows, dtype=torch.long, device=prompt.ids.device)
