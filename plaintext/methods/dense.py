"""Dense baseline: keep and read every entry."""

from __future__ import annotations

from dataclasses import dataclass

from mpckv.plaintext.methods.base import KVMethod
from mpckv.registry import register_method


@register_method("dense")
@dataclass(kw_only=True)
class Dense(KVMethod):
    """Full KV cache, full attention (the reference every method is measured against)."""

    family = "baseline"
    paper = "—"
    secure = "yes"
