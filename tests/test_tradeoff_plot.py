"""Accuracy-against-cache-bytes plot (``mpckv.evals.plots.plot_tradeoff``) and its place in the report."""

from __future__ import annotations

import json

import pytest

from mpckv.evals.plots import plot_results, plot_tradeoff, relative_bytes

pytest.importorskip("matplotlib")


def _rec(method, budget, acc, live, suite="passkey", length=1024, **extra):
    return dict(
        suite=suite, length=length, method=method, budget=budget, mode="query-agnostic", n=4, seed=0,
        model="m", params={}, accuracy=acc, kept_fraction=live / 1000, cache_bytes=live + 10,
        live_cache_bytes=live, dense_cache_bytes=1000, **extra,
    )  # fmt: skip


RECORDS = [
    _rec("dense", None, 1.0, 1000),
    *[_rec("snapkv", b, 0.2 + b, int(1000 * b)) for b in (0.4, 0.1, 0.2)],
    *[_rec("kvquant", b, 0.9, int(250 * b)) for b in (1.0, 0.5)],  # a storage method: bytes ≠ budget
    _rec("snapkv", 0.1, 0.5, 100, suite="kv_retrieval"),
]


def test_relative_bytes_prefers_live_then_allocated_then_kept():
    r = _rec("x", 0.1, 0.5, 120)
    assert relative_bytes(r) == pytest.approx(0.12)
    r.pop("live_cache_bytes")
    assert relative_bytes(r) == pytest.approx(0.13)
    r.pop("dense_cache_bytes")
    assert relative_bytes(r) == pytest.approx(0.12)  # kept_fraction
    assert relative_bytes({"method": "x"}) is None


def test_tradeoff_plot_draws_one_line_per_method_ordered_by_bytes(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn: list[tuple[str, list[float], list[float]]] = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        if "label" in kw:
            drawn.append((kw["label"], list(args[0]), list(args[1])))
        return real(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    path = plot_tradeoff(RECORDS, tmp_path / "t.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    lines = {(lab, tuple(xs)): ys for lab, xs, ys in drawn}
    assert lines[("snapkv", (0.1, 0.2, 0.4))] == pytest.approx([0.3, 0.4, 0.6])  # sorted by x, 3 budgets
    assert lines[("kvquant", (0.125, 0.25))] == [0.9, 0.9]
    assert sum(lab == "snapkv" for lab, _, _ in drawn) == 2  # one per (suite, length) panel


def test_plot_results_writes_tradeoff_and_report_links_it(tmp_path):
    from mpckv.evals.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(RECORDS))
    paths = plot_results(RECORDS, run)
    assert run / "tradeoff.png" in paths
    page = write_report([run], tmp_path / "docs" / "RESULTS.md")
    text = page.read_text()
    assert "## Accuracy against cache bytes" in text and "img/run_tradeoff.png" in text
    assert (tmp_path / "docs" / "img" / "run_tradeoff.png").is_file()
