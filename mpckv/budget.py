"""Typed KV budgets: how many entries a method may keep (or read) per layer and KV head.

A budget is one of

* ``ratio`` — kept fraction in (0, 1] of the prompt length (``0.1`` keeps 10 %),
* ``tokens`` — an absolute number of entries (>= 1),
* ``per_layer`` — one ratio or token count per layer,
* ``per_head`` — one ratio or token count per (layer, KV head).

Ratios always mean the *kept* fraction (kvpress's ``compression_ratio`` is the removed fraction). The
internal quantity every method reports is the kept fraction, so compositions multiply cleanly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from mpckv.errors import BudgetError

BudgetKind = Literal["ratio", "tokens", "per_layer", "per_head"]
Scalar = float | int


def _check_scalar(x: Any, where: str) -> Scalar:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise BudgetError(f"{where}: budget entries must be numbers, got {x!r}")
    if isinstance(x, float) and not math.isfinite(x):
        raise BudgetError(f"{where}: budget must be finite, got {x}")
    if isinstance(x, float) and x.is_integer() and x > 1:
        x = int(x)
    if isinstance(x, float):
        if not 0.0 < x <= 1.0:
            raise BudgetError(f"{where}: a ratio budget must lie in (0, 1], got {x}")
    elif x < 1:
        raise BudgetError(f"{where}: a token budget must be >= 1, got {x}")
    return x


def _tokens(x: Scalar, n: int) -> int:
    if isinstance(x, float):
        return min(n, max(1, math.floor(x * n + 1e-9)))
    return min(n, x)


@dataclass(frozen=True)
class Budget:
    """A validated budget. Build with :meth:`parse` or the ``ratio``/``tokens`` constructors."""

    kind: BudgetKind
    value: Any

    @classmethod
    def ratio(cls, r: float) -> Budget:
        return cls("ratio", _check_scalar(float(r), "ratio"))

    @classmethod
    def tokens(cls, n: int) -> Budget:
        if isinstance(n, bool) or not isinstance(n, int):
            raise BudgetError(f"a token budget must be an int, got {n!r}")
        return cls("tokens", _check_scalar(n, "tokens"))

    @classmethod
    def parse(cls, spec: Any) -> Budget:
        """Accept a Budget, a number, a (JSON) string, a list (per layer) or a list of lists (per head).

        Numbers: a float in (0, 1] is a ratio, an int >= 1 (or a float like ``256.0``) a token count.
        Strings: ``"0.1"``, ``"256"``, ``"[0.2, 0.1]"``, ``"[[64, 32], [16, 16]]"``.
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BudgetError(
                    f"cannot parse budget {text!r}: use a ratio in (0, 1] like 0.1, a token count like 256, "
                    "or a JSON list per layer / list of lists per head"
                ) from exc
        if isinstance(spec, bool) or spec is None:
            raise BudgetError(f"invalid budget {spec!r}")
        if isinstance(spec, int | float):
            v = _check_scalar(spec, "budget")
            return cls("ratio", v) if isinstance(v, float) else cls("tokens", v)
        if isinstance(spec, list | tuple):
            if not spec:
                raise BudgetError("a per-layer budget list must not be empty")
            if all(isinstance(row, list | tuple) for row in spec):
                rows = tuple(
                    tuple(_check_scalar(x, f"per_head[{i}][{j}]") for j, x in enumerate(row))
                    for i, row in enumerate(spec)
                )
                if any(not r for r in rows):
                    raise BudgetError("per-head budget rows must not be empty")
                return cls("per_head", rows)
            return cls("per_layer", tuple(_check_scalar(x, f"per_layer[{i}]") for i, x in enumerate(spec)))
        raise BudgetError(f"unsupported budget type {type(spec).__name__}: {spec!r}")

    def validate(self, num_layers: int, num_kv_heads: int) -> None:
        """Check that per-layer/per-head budgets match the model's shape."""
        if self.kind == "per_layer" and len(self.value) != num_layers:
            raise BudgetError(
                f"per-layer budget has {len(self.value)} entries, model has {num_layers} layers"
            )
        if self.kind == "per_head":
            if len(self.value) != num_layers:
                raise BudgetError(
                    f"per-head budget has {len(self.value)} rows, model has {num_layers} layers"
                )
            bad = [i for i, row in enumerate(self.value) if len(row) != num_kv_heads]
            if bad:
                raise BudgetError(f"per-head budget rows {bad} do not have {num_kv_heads} KV-head entries")

    def tokens_for(self, n: int, layer: int = 0, head: int = 0) -> int:
        """Entries to keep out of ``n`` for ``(layer, head)``; always in ``[min(1, n), n]``."""
        if n <= 0:
            return 0
        if self.kind in ("ratio", "tokens"):
            return _tokens(self.value, n)
        if self.kind == "per_layer":
            return _tokens(self.value[layer], n)
        return _tokens(self.value[layer][head], n)

    def per_head_tokens(self, n: int, layer: int, num_kv_heads: int) -> list[int]:
        return [self.tokens_for(n, layer, h) for h in range(num_kv_heads)]

    def is_uniform_over_heads(self) -> bool:
        return self.kind != "per_head"

    def nominal_fraction(self, n: int) -> float:
        """Mean kept fraction at length ``n`` over layers and heads (for reporting)."""
        if n <= 0:
            return 1.0
        if self.kind in ("ratio", "tokens"):
            return self.tokens_for(n) / n
        if self.kind == "per_layer":
            return sum(_tokens(x, n) for x in self.value) / (n * len(self.value))
        flat = [x for row in self.value for x in row]
        return sum(_tokens(x, n) for x in flat) / (n * len(flat))

    def __str__(self) -> str:
        if self.kind in ("ratio", "tokens"):
            return str(self.value)
        return json.dumps(self.value)
