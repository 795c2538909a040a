"""RULER-style scoring (``mpckv.evals.scoring``) on real model outputs and near misses."""

from __future__ import annotations

import pytest

from mpckv.evals.scoring import contains, exact, first_line, found, normalize, score


@pytest.mark.parametrize(
    ("generation", "answer", "want_contains", "want_exact"),
    [
        (" 41072. This", "41072", 1.0, 0.0),  # SmolLM2's real answer, scored wrong before
        (" 41072", " 41072", 1.0, 1.0),
        ("41072.", "41072", 1.0, 1.0),
        ("The pass key is 41072.", "41072", 1.0, 0.0),
        ("The pass key is **41072**", "41072", 1.0, 0.0),
        ("4107", "41072", 0.0, 0.0),  # truncated
        ("410722", "41072", 0.0, 0.0),  # one digit too many: not a whole-word match
        ("41072-b", "41072", 1.0, 0.0),
        ("a magical door that is hidden in the", "41072", 0.0, 0.0),
        ("", "41072", 0.0, 0.0),
        (
            'The value is "9a1f3c2e-77b0-4d5e-8c1a-2b3c4d5e6f70".',
            "9a1f3c2e-77b0-4d5e-8c1a-2b3c4d5e6f70",
            1.0,
            0.0,
        ),
        ("9A1F3C2E-77B0-4D5E-8C1A-2B3C4D5E6F70", "9a1f3c2e-77b0-4d5e-8c1a-2b3c4d5e6f70", 1.0, 1.0),
        ("9a1f3c2e-77b0-4d5e-8c1a", "9a1f3c2e-77b0-4d5e-8c1a-2b3c4d5e6f70", 0.0, 0.0),
        ("Blue Harbor", "blue harbor", 1.0, 1.0),
        ("blue harbors", "blue harbor", 0.0, 0.0),
    ],
)
def test_single_answer(generation, answer, want_contains, want_exact):
    assert contains(generation, [answer]) == want_contains
    assert exact(generation, [answer]) == want_exact


def test_multi_value():
    refs = ["QWXYZ", "ABCDE", "FGHIJ"]
    assert contains("QWXYZ, ABCDE and FGHIJ", refs) == 1.0
    assert exact("QWXYZ, ABCDE and FGHIJ", refs) == 0.0  # "and" is an extra word
    assert exact("FGHIJ, QWXYZ, ABCDE", refs) == 1.0  # any order
    assert contains("ABCDE, FGHIJ", refs) == pytest.approx(2 / 3)
    assert contains("ABCDEF", refs) == 0.0
    assert exact("ABCDE, ABCDE, FGHIJ", refs) == 0.0


def test_normalize_and_score():
    assert normalize("  Hello,\n  World!! ") == "hello world"
    assert not found("anything", "...")
    s = score(" 41072. This", ["41072"], "contains")
    assert (s.primary, s.contains, s.exact) == (1.0, 1.0, 0.0)
    assert score(" 41072. This", ["41072"], "exact").primary == 0.0
    assert score(" 41072\nmore", [" 41072"], "first_line").primary == 1.0
    assert first_line(" 41072.", [" 41072"]) == 0.0  # the tiny model's metric is strict
    with pytest.raises(ValueError):
        contains("x", [])
    with pytest.raises(ValueError):
        score("x", ["x"], "fuzzy")
