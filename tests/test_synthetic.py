"""Synthetic long-context task generators: determinism, lengths, answers recoverable from the context."""

from __future__ import annotations

import random
import re

import pytest

from mpckv.data import TASKS, Sample, exact_match, make_sample, natural_text_corpus, training_text
from mpckv.data.synthetic import LENGTH_TOLERANCE, filler_text

LENGTHS = (256, 1024, 2048)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample(task: str) -> None:
    a, b = make_sample(task, 1024, seed=7), make_sample(task, 1024, seed=7)
    assert a == b
    c = make_sample(task, 1024, seed=8)
    assert (c.context, c.answer) != (a.context, a.answer)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_length_within_tolerance(task: str, length: int) -> None:
    for seed in range(5):
        s = make_sample(task, length, seed)
        n = len((s.prompt + s.answer).encode())
        assert abs(n - length) <= LENGTH_TOLERANCE * length, (task, length, seed, n)


@pytest.mark.parametrize("task", TASKS)
def test_schema_and_ascii(task: str) -> None:
    s = make_sample(task, 512, 0)
    assert isinstance(s, Sample) and s.task == task
    assert s.prompt == s.context + "\n\n" + s.question
    assert s.answer.startswith(" ") and "\n" not in s.answer
    assert s.text.isascii()
    assert exact_match(s, s.answer + "\nmore") and not exact_match(s, " 0" + s.answer)


@pytest.mark.parametrize("task", ["passkey", "needle", "kv_retrieval", "docqa"])
def test_cue_then_answer_appears_in_context(task: str) -> None:
    """The question ends with a cue that occurs in the context immediately before the answer."""
    for seed in range(5):
        s = make_sample(task, 1024, seed)
        cue = s.question.rsplit("\n", 1)[-1]
        cue = cue[cue.rfind("?") + 1 :].strip() if "?" in cue else cue
        assert cue + s.answer in s.context, (task, seed, cue, s.answer)
        assert s.meta["value"] == s.answer.strip()


def test_multihop_chain_resolves() -> None:
    for seed in range(10):
        s = make_sample("multihop", 1024, seed, hops=3 + seed % 2)
        assignments = dict(re.findall(r"VAR (\w+) = (\w+)\.", s.context))
        start = re.search(r"VAR (\w+) =$", s.question)
        assert start is not None
        name, chain = start.group(1), []
        while name in assignments:
            name = assignments[name]
            chain.append(name)
        assert s.answer == " " + " = ".join(chain)
        assert chain[-1] == s.meta["value"] and chain[-1].isdigit()
        assert len(chain) == s.meta["hops"]


def test_kv_keys_unique_and_hard_mode() -> None:
    for hard in (False, True):
        s = make_sample("kv_retrieval", 2048, 3, hard=hard)
        keys = re.findall(r"^([a-z]{4}): \d{5}$", s.context, flags=re.M)
        assert len(keys) == len(set(keys)) > 100


def test_docqa_has_several_documents() -> None:
    s = make_sample("docqa", 2048, 0)
    assert s.context.count("<doc id=") >= 3 and s.context.count("</doc>") == s.context.count("<doc id=")


def test_training_text_spans() -> None:
    for task in TASKS:
        text, spans = training_text(task, 1024, random.Random(1))
        assert len(text) <= 1024 and spans
        for a, b in spans:
            assert text[a - 1] != " " and text[a] == " " and text[b] == "\n"


def test_filler_exact_enough() -> None:
    rng = random.Random(0)
    for n in (10, 100, 777):
        t = filler_text(n, rng)
        assert n - 3 <= len(t) <= n


def test_natural_text_corpus_reads_stdlib() -> None:
    text = natural_text_corpus(200_000)
    assert len(text) == 200_000 and text.isascii() and "def " in text
    assert natural_text_corpus(1000) == text[:1000]
