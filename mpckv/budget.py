"""Typed KV budgets: how many entries a method may keep (or read) per layer and KV head.

A budget is one of

* ``ratio`` — kept fraction in (0, 1] of the prompt length (``0.1`` keeps 10 %),
* ``tokens`` — an absolute number of entries (>= 1),
* ``per_layer`` — one ratio or token count per layer,
* ``per_head`` — one ratio or token count per (layer, KV head).

Ratios always mean the *kept* fraction (kvpress's ``compression_ratio`` is the removed fraction). The
internal quantity every method reports is the kept fraction, so compositions multiply cleanly.

One rule tells ratios from token counts, everywhere (``generate --budget``, ``eval --budgets``,
``fidelity --budgets``, ``bench secure --budget`` and the Python API): **a whole number written without a
decimal point is a token count** (``1`` keeps one token, ``256`` keeps 256); **a number with a decimal
point or an exponent, or a percentage, is a ratio in (0, 1]** (``0.1``, ``1e-1`` and ``10%`` keep 10 %;
``1.0`` and ``100%`` keep everything). From Python, an ``int`` is a token count and a ``float`` a ratio.
:func:`parse_budget_text` is the one parser of text; :meth:`Budget.parse` accepts text or values.
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
    if isinstance(x, float):
        if not 0.0 < x <= 1.0:
            hint = f" (a token count is written without a decimal point: {int(x)})" if x.is_integer() else ""
            raise BudgetError(f"{where}: a ratio budget must lie in (0, 1], got {x!r}{hint}")
    elif x < 1:
        raise BudgetError(f"{where}: a token budget must be >= 1, got {x}")
    return x


BUDGET_HELP = (
    "a token count without a decimal point (256), a ratio in (0, 1] with a decimal point or a % "
    "(0.1, 10%, 1.0 = all), or a JSON list per layer / list of lists per head"
)


def parse_budget_text(text: str) -> Any:
    """Decode a budget written as text into a number or (nested) list of numbers (see the module rule).

    ``"256"`` → ``256`` (tokens), ``"1"`` → ``1`` (one token), ``"0.1"`` / ``"10%"`` → ``0.1``,
    ``"1.0"`` / ``"100%"`` → ``1.0`` (everything), ``"[0.2, 64]"`` → ``[0.2, 64]``.

    Raises
    ------
    BudgetError
        When the text is none of these; the message is the same for every command.
    """
    body = text.strip()
    if body.endswith("%"):
        try:
            pct = float(body[:-1])
        except ValueError:
            pct = math.nan
        if not math.isfinite(pct):
            raise BudgetError(f"cannot parse budget {text!r}: use {BUDGET_HELP}")
        return pct / 100.0
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        value = None
    if value is None or isinstance(value, bool | str | dict):
        raise BudgetError(f"cannot parse budget {text!r}: use {BUDGET_HELP}")
    return value


def format_budget(value: Any) -> str:
    """Text that :func:`parse_budget_text` reads back as ``value`` (``1.0`` stays a ratio)."""
    if isinstance(value, Budget):
        value = value.value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return json.dumps([_plain(v) for v in value])
    return str(value)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


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
        """Accept a Budget, a number, a string, a list (per layer) or a list of lists (per head).

        Numbers: a ``float`` in (0, 1] is a ratio, an ``int`` >= 1 a token count. Strings follow the
        module rule (:func:`parse_budget_text`): ``"0.1"``, ``"10%"``, ``"256"``, ``"[0.2, 0.1]"``,
        ``"[[64, 32], [16, 16]]"``.
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            spec = parse_budget_text(spec)
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
        return format_budget(self.value)
