"""Data for training and evaluating small models: synthetic long-context tasks and offline natural text."""

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
    "TASKS",
    "Sample",
    "exact_match",
    "filler_text",
    "make_sample",
    "natural_text_corpus",
    "training_text",
]
