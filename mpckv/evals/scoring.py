"""Scoring a generation against the expected answer(s): RULER-style containment and exact match.

RULER (Hsieh et al., 2024, arXiv 2404.06654) scores a generation by whether each reference string occurs
in it (``string_match_all``: the fraction of references found, case-insensitive). We follow that, with two
deviations that make the score harder to fool and easier to trust:

* both sides are *normalised* first (:func:`normalize`: lower case, every run of punctuation or
  whitespace becomes one space), so ``" 41072. This"`` contains ``"41072"``, and a UUID answer still
  matches when the model quotes it;
* a reference must occur as a run of *whole words* of the normalised generation, so ``"410722"`` does
  not contain ``"41072"`` (RULER's plain substring test would count it as correct).

:func:`exact` is the stricter score: the normalised generation consists of exactly the references' words
(for several references, in any order) — ``"41072"`` and ``"41072."`` are exact, ``"The pass key is
41072."`` is contained but not exact. :func:`first_line` is the tiny byte-level model's original metric,
kept so that its published numbers stay comparable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_SEP = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower case; every run of non-alphanumeric characters (punctuation, spaces, newlines) → one space."""
    return _SEP.sub(" ", text.lower()).strip()


def _words(text: str) -> list[str]:
    norm = normalize(text)
    return norm.split(" ") if norm else []


def found(generation: str, reference: str) -> bool:
    """Whether ``reference`` occurs as whole words in ``generation`` (both normalised)."""
    ref = normalize(reference)
    if not ref:
        return False
    return f" {ref} " in f" {normalize(generation)} "


def contains(generation: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``generation`` (RULER's ``string_match_all``; 1.0 or 0.0 for one
    reference)."""
    refs = list(references)
    if not refs:
        raise ValueError("contains() needs at least one reference")
    return sum(found(generation, r) for r in refs) / len(refs)


def exact(generation: str, references: Sequence[str]) -> float:
    """1.0 when the normalised generation is exactly the references' words (any order of references)."""
    refs = list(references)
    if not refs:
        raise ValueError("exact() needs at least one reference")
    gen = _words(generation)
    want = [w for r in refs for w in _words(r)]
    if len(refs) == 1:
        return float(gen == want)
    return float(sorted(gen) == sorted(want))


def first_line(generation: str, references: Sequence[str]) -> float:
    """The tiny byte-level model's metric: the generation's first line, stripped, equals the (single)
    reference, stripped — no other normalisation (:func:`mpckv.data.synthetic.exact_match`)."""
    refs = list(references)
    if len(refs) != 1:
        raise ValueError("first_line() takes exactly one reference")
    return float(generation.split("\n", 1)[0].strip() == refs[0].strip())


METRICS: tuple[str, ...] = ("contains", "exact", "first_line")


@dataclass(frozen=True)
class Score:
    """Both scores of one generation; ``primary`` is the one a suite reports as its accuracy."""

    contains: float
    exact: float
    metric: str  # one of METRICS
    primary: float


def score(generation: str, references: Sequence[str], metric: str = "contains") -> Score:
    """Score ``generation`` against ``references`` with both metrics; ``metric`` names the primary one."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    c, e = contains(generation, references), exact(generation, references)
    primary = {"contains": c, "exact": e}.get(metric)
    return Score(c, e, metric, first_line(generation, references) if primary is None else primary)
