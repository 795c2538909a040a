from __future__ import annotations

import pytest

from mpckv import Budget, BudgetError


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [
        (0.1, "ratio", 0.1),
        (1.0, "ratio", 1.0),
        (256, "tokens", 256),
        ("0.25", "ratio", 0.25),
        ("64", "tokens", 64),
        ("1", "tokens", 1),  # one token: a whole number without a decimal point is a count
        ("1.0", "ratio", 1.0),  # everything: a decimal point makes a ratio
        ("100%", "ratio", 1.0),
        ("10%", "ratio", 0.1),
        ("1e-1", "ratio", 0.1),
        (" 256 ", "tokens", 256),
        ("[0.2, 16]", "per_layer", (0.2, 16)),
        ([[4, 8], [0.5, 1.0]], "per_head", ((4, 8), (0.5, 1.0))),
    ],
)
def test_parse(spec, kind, value):
    b = Budget.parse(spec)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize(
    "spec",
    [0.0, -0.1, 1.5, -3, 0, "abc", "", None, True, float("nan"), [], [[]], "[1, -2]", {"a": 1}]
    + [128.0, "256.0", "1e8", "150%", "0%", "x%", "true", '"0.1"', "null", "nan"],
)
def test_rejects(spec):
    with pytest.raises(BudgetError):
        Budget.parse(spec)


def test_tokens_for():
    assert Budget.parse(0.1).tokens_for(1000) == 100
    assert Budget.parse(0.1).tokens_for(5) == 1  # never zero
    assert Budget.parse(1.0).tokens_for(37) == 37
    assert Budget.parse(64).tokens_for(10) == 10  # clamped to the length
    assert Budget.parse(64).tokens_for(0) == 0
    b = Budget.parse([[4, 8], [0.5, 1.0]])
    assert b.per_head_tokens(20, 0, 2) == [4, 8]
    assert b.per_head_tokens(20, 1, 2) == [10, 20]


def test_validate_shape():
    Budget.parse([0.1, 0.2, 0.3]).validate(3, 2)
    with pytest.raises(BudgetError, match="3 layers"):
        Budget.parse([0.1, 0.2]).validate(3, 2)
    with pytest.raises(BudgetError, match="KV-head"):
        Budget.parse([[1, 2, 3]] * 3).validate(3, 2)


def test_nominal_fraction():
    assert Budget.parse(0.25).nominal_fraction(100) == pytest.approx(0.25)
    assert Budget.parse([10, 30]).nominal_fraction(100) == pytest.approx(0.2)


def test_a_float_count_gets_a_hint():
    with pytest.raises(
        BudgetError, match=r"got 256.0 \(a token count is written without a decimal point: 256\)"
    ):
        Budget.parse("256.0")


@pytest.mark.parametrize("spec", ["1", "1.0", "0.05", "256", "[0.5, 4]", "[[4, 0.5], [1.0, 2]]"])
def test_format_round_trips(spec):
    from mpckv.budget import format_budget

    b = Budget.parse(spec)
    again = Budget.parse(format_budget(b))
    assert (again.kind, again.value) == (b.kind, b.value)
    assert [type(x) for x in _flat(again.value)] == [type(x) for x in _flat(b.value)]
    assert str(b) == format_budget(b)


def _flat(v):
    return [y for x in v for y in _flat(x)] if isinstance(v, tuple | list) else [v]


def test_bad_text_message_is_shared_by_every_command():
    from mpckv.evals.config import parse_budget

    with pytest.raises(BudgetError) as a:
        Budget.parse("abc")
    with pytest.raises(BudgetError) as b:
        parse_budget("abc")
    assert str(a.value) == str(b.value)
    assert "token count without a decimal point" in str(a.value)
