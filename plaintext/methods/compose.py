"""Composition of methods: hooks run in order; the kept fraction is the product of kept fractions.

Example: ``get_method("snapkv+quest")`` evicts with SnapKV at prefill, then selects pages with Quest over
what SnapKV kept, reading ``r_snapkv · r_quest`` of the prompt per step. When two parts return a
selection at decode, the later one must accept an existing selection through ``ctx.state`` — so at most
one selecting part is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection


@dataclass(kw_only=True)
class Composed(KVMethod):
    """Run several methods in order (``a+b``)."""

    parts: list[KVMethod] = field(default_factory=list)

    def __init__(self, parts: list[KVMethod]) -> None:
        if len(parts) < 2:
            raise ConfigError("a composition needs at least two methods")
        self.parts = list(parts)
        self.budget = None
        super().__post_init__()

    name = "composed"
    family = "composition"

    @property
    def label(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def needs_decode_probs(self) -> bool:
        return any(p.needs_decode_probs for p in self.parts)

    def check(self, config: ModelConfig) -> None:
        for p in self.parts:
            p.check(config)
        selecting = [p.name for p in self.parts if type(p).select is not KVMethod.select]
        if len(selecting) > 1:
            raise ConfigError(f"at most one decode-time selector per composition, got {selecting}")

    def _sub(self, ctx: Any, i: int) -> Any:
        sub = ctx.state.setdefault(f"part{i}", {})
        return type(ctx)(**{**vars(ctx), "state": sub})

    def on_prefill(self, ctx: PrefillContext) -> None:
        for i, p in enumerate(self.parts):
            p.on_prefill(self._sub(ctx, i))

    def before_append(self, ctx: DecodeContext) -> None:
        for i, p in enumerate(self.parts):
            p.before_append(self._sub(ctx, i))

    def select(self, ctx: DecodeContext) -> Selection | None:
        for i, p in enumerate(self.parts):
            sel = p.select(self._sub(ctx, i))
            if sel is not None:
                return sel
        return None

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        for i, p in enumerate(self.parts):
            p.after_attention(self._sub(ctx, i), probs)

    def describe(self) -> dict[str, Any]:
        return {"method": self.label, "parts": [p.describe() for p in self.parts]}
