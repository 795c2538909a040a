"""Evaluation suites: deterministic samples in one schema, and the held-out natural text for ``ppl``.

Every question-answering suite is a task of :mod:`mpckv.data.synthetic` (passkey, multi-key needle,
key-value retrieval, multi-hop variable tracking, document QA); sample ``i`` of a cell with seed ``s`` is
``make_sample(task, length, seed=s * 1_000_000 + i)``, so the same flags always give the same samples.
The schema is kvpress's: ``(context, question, answer)``; the prompt is ``context + "\\n\\n" + question``.

``ppl`` prefills ``length`` bytes of held-out natural text and teacher-forces the next ``ppl_tokens``
(default 128) bytes. The text comes from :func:`mpckv.data.natural_text_corpus` beyond the bytes the tiny
model trains on (``examples/train_tiny.py --corpus-bytes`` defaults to 6 000 000): bytes
``[HELDOUT_START, HELDOUT_END)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mpckv.data.synthetic import TASKS, Sample, make_sample, natural_text_corpus
from mpckv.errors import ConfigError

SUITES: tuple[str, ...] = (*TASKS, "ppl")
QA_SUITES: tuple[str, ...] = TASKS
HELDOUT_START = 6_000_000
HELDOUT_END = 7_000_000
SEED_STRIDE = 1_000_000


@lru_cache(maxsize=1)
def heldout_text() -> str:
    """The held-out natural-text slice used by the ``ppl`` suite (read once per process)."""
    text = natural_text_corpus(HELDOUT_END)[HELDOUT_START:]
    if len(text) < 10_000:
        raise ConfigError(
            f"the held-out natural text has only {len(text)} bytes (standard library too small?)"
        )
    return text


@dataclass(frozen=True)
class PplSample:
    """``context`` is prefilled (and compressed); ``continuation`` is teacher-forced and scored."""

    context: str
    continuation: str


def sample_seed(seed: int, i: int) -> int:
    return seed * SEED_STRIDE + i


def qa_samples(suite: str, length: int, n: int, seed: int, **kw: Any) -> list[Sample]:
    """``n`` deterministic samples of a question-answering suite at ``length`` bytes."""
    if suite not in QA_SUITES:
        raise ConfigError(f"{suite!r} is not a question-answering suite; choose from {', '.join(QA_SUITES)}")
    return [make_sample(suite, length, seed=sample_seed(seed, i), **kw) for i in range(n)]


def ppl_samples(
    length: int, n: int, seed: int, continuation: int = 128, text: str | None = None
) -> list[PplSample]:
    """``n`` windows of ``length + continuation`` bytes at seeded offsets of the held-out text."""
    text = heldout_text() if text is None else text
    span = length + continuation
    if len(text) <= span:
        raise ConfigError(
            f"ppl length {length} + {continuation} exceeds the held-out text ({len(text)} bytes)"
        )
    out = []
    for i in range(n):
        rng = random.Random(f"ppl/{length}/{sample_seed(seed, i)}")
        start = rng.randrange(0, len(text) - span)
        out.append(PplSample(text[start : start + length], text[start + length : start + span]))
    return out


def split_prompt(sample: Sample) -> tuple[str, str]:
    """``(context part, question part)`` of ``sample.prompt``: what is prefilled (and compressed) in
    query-agnostic mode, and what is fed afterwards with ``Engine.extend``."""
    prompt = sample.prompt
    cut = len(prompt) - len(sample.question)
    return prompt[:cut], prompt[cut:]
