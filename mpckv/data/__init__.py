"""Data for training and evaluating models: synthetic long-context tasks for the byte-level model,
RULER-style tasks on generated prose for real tokenizers, and offline natural text."""

from mpckv.data.ruler import RULER_TASKS, RulerSample, make_ruler_sample
from mpckv.data.synthetic import (
    TASKS,
    Sample,
    exact_match,
    filler_text,
    make_sample,
    natural_text_corpus,
    training_text,
)

__all__ = [
    "RULER_TASKS",
    "TASKS",
    "RulerSample",
    "Sample",
    "exact_match",
    "filler_text",
    "make_ruler_sample",
    "make_sample",
    "natural_text_corpus",
    "training_text",
]
