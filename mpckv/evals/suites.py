"""Evaluation suites: deterministic samples in one schema, and the held-out natural text for ``ppl``.

The question-answering suites (passkey, multi-key needle, key-value retrieval, multi-hop variable
tracking, document QA) exist in two variants under the same names; :func:`prepare_qa` picks one by the
model's tokenizer:

* the built-in **byte tokenizer** (the tiny model, random test checkpoints): the copy-friendly tasks of
  :mod:`mpckv.data.synthetic`; ``length`` is bytes (= tokens) of ``prompt + answer``; the prompt is
  ``context + "\\n\\n" + question``, scored by :func:`mpckv.evals.scoring.first_line` (unchanged from
  before, so the tiny model's numbers stay comparable);
* a **real tokenizer**: the RULER-style tasks of :mod:`mpckv.data.ruler` on natural prose, rendered with the
  chat template when the tokenizer has one; ``length`` is prompt tokens (template and answer cue included,
  at most ``length`` and within a filler sentence of it), scored by RULER's containment
  (:func:`mpckv.evals.scoring.contains`), with exact match recorded beside it.

Sample ``i`` of a cell with seed ``s`` has seed ``s * 1_000_000 + i``, so the same flags always give the
same samples.

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
from mpckv.tokenizer import ByteTokenizer

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


@dataclass(frozen=True)
class Prepared:
    """A question-answering sample as token ids: ``prefix_ids`` are prefilled (and compressed) in
    query-agnostic mode, ``suffix_ids`` fed afterwards; in question-in-prompt mode both are prefilled."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    answers: tuple[str, ...]
    metric: str  # a metric of mpckv.evals.scoring
    max_new_tokens: int
    prompt_tail: str  # the end of the prompt text, for predictions.jsonl

    @property
    def answer(self) -> str:
        return self.answers[0] if len(self.answers) == 1 else ", ".join(self.answers)


def natural_tasks(tokenizer: Any) -> bool:
    """Whether a model gets the natural-text (RULER) variant of the suites: any non-byte tokenizer."""
    return not isinstance(tokenizer, ByteTokenizer)


def prepare_qa(suite: str, length: int, n: int, seed: int, tokenizer: Any, model: Any) -> list[Prepared]:
    """``n`` samples of ``suite`` at ``length``, tokenised for ``model`` (variant chosen by the tokenizer)."""
    from mpckv.evals import common

    if suite not in QA_SUITES:
        raise ConfigError(f"{suite!r} is not a question-answering suite; choose from {', '.join(QA_SUITES)}")
    tail = 240
    if not natural_tasks(tokenizer):
        out = []
        for s in qa_samples(suite, length, n, seed):
            ctx, q = split_prompt(s)
            a_len = len(common.encode(tokenizer, model, s.answer, bos=False))
            out.append(
                Prepared(
                    common.encode(tokenizer, model, ctx, bos=True),
                    common.encode(tokenizer, model, q, bos=False),
                    (s.answer,),
                    "first_line",
                    a_len + 2,
                    s.prompt[-tail:],
                )
            )
        return out
    from mpckv.data.ruler import make_ruler_sample

    def enc(text: str, bos: bool) -> list[int]:
        return common.encode(tokenizer, model, text, bos=bos)

    samples = [make_ruler_sample(suite, length, sample_seed(seed, i), tokenizer, enc) for i in range(n)]
    return [
        Prepared(
            list(r.prefix_ids),
            list(r.suffix_ids),
            r.answers,
            r.metric,
            r.max_new_tokens,
            (r.prefix + r.suffix)[-tail:],
        )
        for r in samples
    ]


def prepare_ppl(
    length: int, n: int, seed: int, ppl_tokens: int, tokenizer: Any, model: Any
) -> list[tuple[list[int], list[int]]]:
    """``n`` ``(context ids, continuation ids)`` pairs of held-out text.

    Byte tokenizer: ``length`` bytes of context and ``ppl_tokens`` bytes of continuation (as before).
    A real tokenizer: a window of the text is tokenised and cut into ``length`` context tokens (BOS
    included when the model has one) and the next ``ppl_tokens`` tokens, so both are exact token counts.
    """
    from mpckv.evals import common

    if not natural_tasks(tokenizer):
        return [
            (
                common.encode(tokenizer, model, s.context, bos=True),
                common.encode(tokenizer, model, s.continuation, bos=False),
            )
            for s in ppl_samples(length, n, seed, ppl_tokens)
        ]
    text = heldout_text()
    out = []
    for s in ppl_samples(min(8 * (length + ppl_tokens), len(text) // 2), n, seed, 0, text):
        bos = common.encode(tokenizer, model, "", bos=True)
        ids = bos + common.encode(tokenizer, model, s.context, bos=False)
        if len(ids) < length + ppl_tokens:
            raise ConfigError(f"the held-out text gives only {len(ids)} tokens for ppl length {length}")
        out.append((ids[:length], ids[length : length + ppl_tokens]))
    return out
