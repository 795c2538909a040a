"""Typed configuration of an evaluation run, the parsers behind the CLI flags, and the grid of cells.

A *cell* is one ``(suite, length, method, budget, mode)`` combination evaluated on ``n`` samples; its
:meth:`Cell.key` (together with ``n``, ``seed``, the model id and the method's hyper-parameters) names it in
``results.json`` so that reruns skip cells that are already done (kvpress's "output directories named by
config, skipped if already done", here at cell granularity).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from mpckv.budget import format_budget
from mpckv.errors import BudgetError, ConfigError

Mode = Literal["query-agnostic", "question-in-prompt"]
MODES: tuple[str, ...] = ("query-agnostic", "question-in-prompt")
DEFAULT_BUDGETS = "0.05,0.1,0.2"
MIN_LENGTH = 64


def _split(text: str | Sequence[str], what: str) -> list[str]:
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise ConfigError(f"{what} must not be empty")
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} lists an entry twice: {','.join(out)}")
    return out


def parse_suites(text: str | Sequence[str]) -> list[str]:
    """``"passkey,ppl"`` → ``["passkey", "ppl"]``; ``"all"`` → every suite."""
    from mpckv.evals.suites import SUITES

    names = _split(text, "--suite")
    if names == ["all"]:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad:
        raise ConfigError(f"unknown suite(s) {', '.join(map(repr, bad))}; choose from {', '.join(SUITES)}")
    return names


def parse_lengths(text: str | Sequence[str]) -> list[int]:
    """``"1024,2048"`` → ``[1024, 2048]`` (prompt lengths in tokens — bytes for the byte-level model — each
    >= 64)."""
    out = []
    for item in _split(text, "--lengths"):
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"--lengths expects integers like 1024,2048; got {item!r}") from None
        if value < MIN_LENGTH:
            raise ConfigError(f"--lengths entries must be >= {MIN_LENGTH}, got {value}")
        out.append(value)
    return out


def parse_budget(value: Any) -> float | int:
    """One budget, by the rule of :mod:`mpckv.budget` (the same parser as ``generate --budget``).

    ``"0.1"`` / ``"10%"`` / ``0.1`` → ratio ``0.1``; ``"1.0"`` / ``"100%"`` → ``1.0`` (everything);
    ``"256"`` / ``256`` → 256 tokens; ``"1"`` → one token.
    """
    from mpckv.budget import Budget

    budget = Budget.parse(value)
    if budget.kind not in ("ratio", "tokens"):
        raise BudgetError(f"--budgets takes one ratio or token count per entry, got {value!r}")
    return cast(float | int, budget.value)


def parse_budgets(text: str | Sequence[Any]) -> list[float | int]:
    items = _split(text, "--budgets") if isinstance(text, str) else list(text)
    if not items:
        raise ConfigError("--budgets must not be empty")
    return [parse_budget(x) for x in items]


def takes_budget(method: str) -> bool:
    """Every method except the baseline (``dense``) runs at each budget."""
    from mpckv.registry import method_class

    return any(getattr(method_class(p.strip()), "family", "") != "baseline" for p in method.split("+"))


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"dense,snapkv"`` → names checked against the registry; ``"all"`` → every registered method."""
    from mpckv.registry import list_methods, method_class

    names = _split(text, "--methods")
    if names == ["all"]:
        return [m.name for m in list_methods()]
    for name in names:
        for part in name.split("+"):
            method_class(part.strip())  # raises UnknownMethodError
    return names


def parse_method_params(
    items: Sequence[str], methods: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``["snapkv.window=16", "quest.page_size=8"]`` → ``{"snapkv": {"window": 16}, "quest": {...}}``.

    Values are decoded as JSON when possible. With ``methods``, a method not in the list is an error.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        lhs, sep, raw = item.partition("=")
        method, dot, key = lhs.strip().rpartition(".")
        if not sep or not dot or not method or not key.isidentifier():
            raise ConfigError(f"--param expects method.key=value (e.g. snapkv.window=16), got {item!r}")
        if key == "budget":
            raise ConfigError("give budgets with --budgets, not --param method.budget=...")
        if methods is not None and method not in methods:
            raise ConfigError(f"--param {lhs} names method {method!r}, which is not in --methods")
        if key in out.setdefault(method, {}):
            raise ConfigError(f"--param {lhs} given more than once")
        try:
            out[method][key] = json.loads(raw)
        except json.JSONDecodeError:
            out[method][key] = raw
    return out


@dataclass(frozen=True)
class Cell:
    """One grid point; ``budget`` is ``None`` for dense."""

    suite: str
    length: int
    method: str
    budget: float | int | None
    mode: str


@dataclass
class EvalConfig:
    """Everything ``mpckv eval`` needs (validated on construction; raises :class:`ConfigError`)."""

    model: str
    out: str | Path
    suites: list[str] = field(default_factory=lambda: parse_suites("all"))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    methods: list[str] = field(default_factory=lambda: parse_methods("all"))
    budgets: list[float | int] = field(default_factory=lambda: parse_budgets(DEFAULT_BUDGETS))
    n: int = 20
    seed: int = 0
    mode: str = "query-agnostic"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int | None = None  # None = auto (longest answer + 2)
    batch_size: int | None = None  # None = auto (all n for the byte model, 4 otherwise); 0 = all n
    ppl_tokens: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    command: str = ""
    prefill_cache: str | None = None  # directory of recorded dense prefills shared between runs (not in keys)

    def __post_init__(self) -> None:
        self.suites = parse_suites(self.suites)
        lengths = self.lengths
        self.lengths = parse_lengths(lengths if isinstance(lengths, str) else [str(x) for x in lengths])
        self.methods = parse_methods(self.methods)
        self.budgets = parse_budgets(self.budgets)
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")
        if self.batch_size is not None and self.batch_size < 0:
            raise ConfigError(f"--batch-size must be >= 0, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1 or auto, got {self.max_new_tokens}")
        if self.ppl_tokens < 2:
            raise ConfigError(f"ppl_tokens must be >= 2, got {self.ppl_tokens}")
        bad = [m for m in self.params if m not in self.methods]
        if bad:
            raise ConfigError(f"--param names method(s) {bad} that are not in --methods")
        self.check_methods()

    def command_line(self) -> str:
        """The normalised ``mpckv eval`` command line of this config (recorded in ``meta.json``)."""
        import shlex

        parts = ["mpckv", "eval", "--model", str(self.model), "--suite", ",".join(self.suites)]
        parts += ["--lengths", ",".join(map(str, self.lengths)), "--methods", ",".join(self.methods)]
        parts += ["--budgets", ",".join(format_budget(b) for b in self.budgets), "--out", str(self.out)]
        parts += ["--n", str(self.n), "--seed", str(self.seed), "--mode", self.mode]
        for method, kv in self.params.items():
            for k, v in kv.items():
                parts += ["--param", f"{method}.{k}={v if isinstance(v, str) else json.dumps(v)}"]
        if self.max_new_tokens is not None:
            parts += ["--max-new-tokens", str(self.max_new_tokens)]
        if self.batch_size is not None:
            parts += ["--batch-size", str(self.batch_size)]
        if self.ppl_tokens != 128:
            parts += ["--ppl-tokens", str(self.ppl_tokens)]
        if self.dtype != "float32" or self.device != "cpu":
            parts += ["--dtype", self.dtype, "--device", self.device]
        return shlex.join(parts)

    def check_methods(self) -> None:
        """Instantiate every (method, budget) once so that bad parameters fail before the model loads."""
        from mpckv.registry import get_method

        for method in self.methods:
            for budget in self.method_budgets(method):
                get_method(method, **self.method_params(method, budget))

    def method_budgets(self, method: str) -> list[float | int | None]:
        return list(self.budgets) if takes_budget(method) else [None]

    def method_params(self, method: str, budget: float | int | None) -> dict[str, Any]:
        """Keyword arguments for :func:`mpckv.get_method` (``budget`` included when not dense)."""
        params = dict(self.params.get(method, {}))
        if budget is not None:
            params["budget"] = budget
        return params

    def cells(self) -> list[Cell]:
        """The whole grid in run order: per (suite, length), dense first, then methods × budgets."""
        order = sorted(self.methods, key=lambda m: (takes_budget(m), self.methods.index(m)))
        return [
            Cell(suite, length, method, budget, self.mode)
            for suite in self.suites
            for length in self.lengths
            for method in order
            for budget in self.method_budgets(method)
        ]

    def key(self, cell: Cell, model_id: str) -> str:
        """Identity of a cell's result: suite, length, method, budget, mode, n, seed, model, parameters."""
        return cell_key(
            {
                "suite": cell.suite,
                "length": cell.length,
                "method": cell.method,
                "budget": cell.budget,
                "mode": cell.mode,
                "n": self.n,
                "seed": self.seed,
                "model": model_id,
                "params": self.params.get(cell.method, {}),
            }
        )


KEY_FIELDS = ("suite", "length", "method", "budget", "mode", "n", "seed", "model", "params")


def cell_key(record: dict[str, Any]) -> str:
    """The resume key of a record (``params`` sorted, so that key order does not matter)."""
    return json.dumps([record.get(f) for f in KEY_FIELDS], sort_keys=True)
