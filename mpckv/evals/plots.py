"""PNG plots of eval records: one figure per suite, one subplot per length, one line per method.

The x axis is the budget (log scale); dense is a dashed horizontal line. Question suites plot the suite's
accuracy, ``ppl`` plots perplexity. :func:`plot_tradeoff` puts every method of a run on axes of accuracy
against measured cache bytes relative to dense (``tradeoff.png``). Needs matplotlib (the ``eval``
extra); the Agg backend is used, so no display is required.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
_LINES = ("-", "-.", ":")


def _metric(suite: str) -> tuple[str, str]:
    return ("ppl", "perplexity") if suite == "ppl" else ("accuracy", "accuracy")


def plot_suite(records: Sequence[dict[str, Any]], suite: str, path: str | Path) -> Path:
    """Write the figure of one suite to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    key, label = _metric(suite)
    recs = [r for r in records if r["suite"] == suite and isinstance(r.get(key), int | float)]
    lengths = sorted({int(r["length"]) for r in recs})
    modes = sorted({r["mode"] for r in recs})
    fig, axes = plt.subplots(
        1, max(1, len(lengths)), figsize=(4.2 * max(1, len(lengths)), 3.4), squeeze=False, sharey=True
    )
    for ax, length in zip(axes[0], lengths, strict=False):
        at = [r for r in recs if int(r["length"]) == length]
        budgets = sorted({float(r["budget"]) for r in at if r["budget"] is not None})
        series: dict[str, dict[float, float]] = {}
        for r in at:
            name = r["method"] if len(modes) == 1 else f"{r['method']} [{r['mode']}]"
            if r["budget"] is None:
                ax.axhline(float(r[key]), linestyle="--", color="black", linewidth=1, label=f"{name} (full)")
            else:
                series.setdefault(name, {})[float(r["budget"])] = float(r[key])
        for j, (name, pts) in enumerate(sorted(series.items())):
            xs = sorted(pts)
            style = {"marker": _MARKERS[j % len(_MARKERS)], "linestyle": _LINES[(j // 10) % len(_LINES)]}
            ax.plot(xs, [pts[x] for x in xs], markersize=4, label=name, alpha=0.85, **style)
        if budgets and min(budgets) > 0:
            ax.set_xscale("log")
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}" for b in budgets], rotation=45, fontsize=7)
            ax.minorticks_off()
        ax.set_title(f"{suite}, length {length}", fontsize=9)
        ax.set_xlabel("budget", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(label, fontsize=8)
    if key == "accuracy":
        axes[0][0].set_ylim(-0.03, 1.03)
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def relative_bytes(r: dict[str, Any]) -> float | None:
    """Measured cache size of a record relative to dense: live bytes / dense bytes (allocated bytes or
    the kept fraction when a record lacks them); ``None`` when nothing is recorded."""
    dense = r.get("dense_cache_bytes")
    for key in ("live_cache_bytes", "cache_bytes"):
        val = r.get(key)
        if isinstance(val, int | float) and isinstance(dense, int | float) and dense > 0:
            return float(val) / float(dense)
    kept = r.get("kept_fraction")
    return float(kept) if isinstance(kept, int | float) else None


def plot_tradeoff(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (perplexity for ``ppl``) against measured cache bytes relative to dense, every method.

    One subplot per (suite, length); one line per method (and mode / parameters when a run mixes
    several) through its budgets, ordered by x; a marker per method; dense is the point at x = 1 and a
    dashed line. Generic over methods, so storage methods (quantisation, …) land on the same axes.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = sorted({(str(r["suite"]), int(r["length"])) for r in records})
    modes = {r.get("mode") for r in records}
    names = sorted({_series_name(r, len(modes) > 1) for r in records if r.get("budget") is not None})
    palette = [
        plt.get_cmap("tab10")(i) for i in range(10)
    ]  # one colour, marker and line style per method, on every panel
    style = {
        m: (
            _MARKERS[j % len(_MARKERS)],
            _LINES[(j // len(_MARKERS)) % len(_LINES)],
            palette[j % len(palette)],
        )
        for j, m in enumerate(names)
    }
    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (suite, length) in zip(axes.flat, panels, strict=False):
        key, label = _metric(suite)
        at = [r for r in records if r["suite"] == suite and int(r["length"]) == length]
        series: dict[str, list[tuple[float, float]]] = {}
        for r in at:
            x, y = relative_bytes(r), r.get(key)
            if x is None or not isinstance(y, int | float):
                continue
            if r.get("budget") is None:
                ax.axhline(
                    float(y), linestyle="--", color="black", linewidth=1, label=f"{r['method']} (full)"
                )
                ax.plot([x], [float(y)], marker="o", color="black", markersize=4)
            else:
                series.setdefault(_series_name(r, len(modes) > 1), []).append((x, float(y)))
        for name, pts in sorted(series.items()):
            pts.sort()
            marker, line, color = style[name]
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=marker, linestyle=line, color=color, markersize=4, label=name, alpha=0.85)
        ax.set_xscale("log")
        ax.set_title(f"{suite}, length {length}", fontsize=9)
        ax.set_xlabel("cache bytes / dense (measured)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        if key == "accuracy":
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3, which="both")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _series_name(r: dict[str, Any], with_mode: bool) -> str:
    name = str(r["method"])
    params = r.get("params") or {}
    if params:
        name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    return f"{name} [{r.get('mode')}]" if with_mode else name


def plot_results(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``out_dir/plot_<suite>.png`` for every suite in ``records`` and ``out_dir/tradeoff.png`` (accuracy
    against cache bytes, :func:`plot_tradeoff`); ``[]`` (with a warning) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed; skipping plots (pip install 'mpckv[eval]')")
        return []
    suites = list(dict.fromkeys(r["suite"] for r in records))
    paths = [plot_suite(records, s, Path(out_dir) / f"plot_{s}.png") for s in suites]
    if records:
        paths.append(plot_tradeoff(records, Path(out_dir) / "tradeoff.png"))
    return paths
