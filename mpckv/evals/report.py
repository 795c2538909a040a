"""Markdown tables from eval records: ``results.md`` of one run and the ``docs/RESULTS.md`` page.

Tables are per suite: one row per method × budget (× mode / model when a run mixes several), one column per
length. A question-answering cell reads ``acc% · kept/read`` (the suite's accuracy in percent, mean kept
fraction of the KV cache, mean fraction of entries read per decode step, both relative to dense); a ``ppl``
cell reads ``ppl · kept/read``.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpckv.errors import ConfigError
from mpckv.evals import common

LEGEND = (
    "Cells: `accuracy % · kept/read` for question suites, `perplexity · kept/read` for `ppl`; kept = mean "
    "fraction of the dense KV cache kept, read = mean fraction of dense entries read per decode step. "
    "L = prompt tokens (bytes for the byte-level tiny model). Accuracy is RULER-style containment of the "
    "answer in the normalised generation for models with a real tokenizer (exact match is "
    "`accuracy_exact` in results.json) and first-line exact match for the byte-level model."
)


def _suite_order(records: Sequence[dict[str, Any]]) -> list[str]:
    from mpckv.evals.suites import SUITES

    present = {r["suite"] for r in records}
    return [s for s in SUITES if s in present] + sorted(present - set(SUITES))


def _budget_sort(b: Any) -> tuple[int, float]:
    if b is None:
        return (0, 0.0)
    return (1, float(b)) if float(b) <= 1 else (2, float(b))


def _fmt_budget(b: Any) -> str:
    if b is None:
        return "full"
    return f"{b:g}" if isinstance(b, float) else f"{b} tok"


def _cell_text(r: dict[str, Any]) -> str:
    kept = r.get("kept_fraction")
    read = r.get("read_fraction")
    frac = f"{kept:.2f}/{read:.2f}" if kept is not None and read is not None else "?"
    if r.get("suite") == "ppl" or r.get("accuracy") is None:
        ppl = r.get("ppl")
        return f"{ppl:.2f} · {frac}" if isinstance(ppl, int | float) else f"? · {frac}"
    return f"{100 * r['accuracy']:.0f} · {frac}"


def _method_label(r: dict[str, Any]) -> str:
    """The method name, with its non-default parameters when the run set any (``nosa (bias=zero)``)."""
    params = r.get("params") or {}
    if not params:
        return str(r["method"])
    text = ", ".join(f"{k}={params[k]}" for k in sorted(params))
    return f"{r['method']} ({text})"


def suite_table(records: Sequence[dict[str, Any]], suite: str) -> str:
    """The markdown table of one suite (the last record wins when a row/length appears twice)."""
    recs = [r for r in records if r["suite"] == suite]
    modes = sorted({r["mode"] for r in recs})
    models = sorted({r["model"] for r in recs})
    lengths = sorted({int(r["length"]) for r in recs})
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(_method_label(r) for r in recs))}
    cells: dict[tuple[Any, ...], dict[int, str]] = {}
    for r in recs:
        row = (_method_label(r), r["budget"], r["mode"], r["model"])
        cells.setdefault(row, {})[int(r["length"])] = _cell_text(r)
    rows = sorted(
        cells,
        key=lambda k: (k[0] != "dense", method_rank[k[0]], _budget_sort(k[1]), k[2], k[3]),
    )
    head = (
        ["method", "budget"] + (["mode"] if len(modes) > 1 else []) + (["model"] if len(models) > 1 else [])
    )
    lines = [
        "| " + " | ".join(head + [f"L={n}" for n in lengths]) + " |",
        "|" + "---|" * (len(head) + len(lengths)),
    ]
    for row in rows:
        name, _, extra = row[0].partition(" ")
        left = [f"`{name}`" + (f" {extra}" if extra else ""), _fmt_budget(row[1])]
        left += [row[2]] if len(modes) > 1 else []
        left += [row[3]] if len(models) > 1 else []
        vals = [cells[row].get(n, "—") for n in lengths]
        lines.append("| " + " | ".join(left + vals) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(records: Sequence[dict[str, Any]], title: str = "Evaluation results") -> str:
    """``results.md`` of one output directory."""
    parts = [f"# {title}\n", LEGEND + "\n"]
    models = sorted({r["model"] for r in records})
    modes = sorted({r["mode"] for r in records})
    if records:
        parts.append(f"Model(s): {', '.join(models)}; mode(s): {', '.join(modes)}.\n")
    for suite in _suite_order(records):
        parts.append(f"## {suite}\n")
        parts.append(suite_table(records, suite))
    return "\n".join(parts)


def fidelity_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`mpckv.evals.fidelity.fidelity` records."""
    lines = [
        "| method | budget | top-1 agreement | mean KL(dense‖method) | max KL | kept | read | steps × n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| `{r['method']}` | {_fmt_budget(r['budget'])} | {r['top1_agreement']:.3f} | "
            f"{r['kl_mean']:.4g} | "
            f"{r['kl_max']:.4g} | {r['kept_fraction']:.2f} | {r['read_fraction']:.2f} | "
            f"{r['steps']} × {r['n']} |"
        )
    return "\n".join(lines) + "\n"


BENCH_LEGEND = (
    "`stock` = CrypTen's Beaver products (K, V and weights re-masked every step); `persistent` = "
    "persistent masks on the KV cache and the weights (each opened once, then O(d + n) per step). "
    "`decode` rows: a secret cache of n entries from a plaintext prefill of a public random prompt "
    "(cost does not depend on values); `prefill` rows: a real secure prefill of n tokens (one-time). LAN = "
    "1 Gbps / 0.5 ms RTT, WAN = 100 Mbps / 40 ms RTT, modelled as wall + rounds·RTT + bytes/bandwidth; "
    "wall seconds were measured on a shared 2-core machine."
)


def write_report(
    dirs: Sequence[str | Path],
    out: str | Path,
    command: str = "",
    fidelity: Sequence[str | Path] = (),
    bench: Sequence[str | Path] = (),
    notes: str | Path | None = None,
) -> Path:
    """Write the results page (``docs/RESULTS.md``) from eval output directories.

    Plots ``DIR/plot_<suite>.png`` are copied to ``<out dir>/img/<DIR name>_<suite>.png`` and linked, and
    ``DIR/tradeoff.png`` (accuracy against cache bytes) to ``<out dir>/img/<DIR name>_tradeoff.png``.
    ``fidelity`` lists JSON files written by ``mpckv fidelity --out``; ``bench`` JSON files written by
    ``mpckv bench secure --json`` (one table each, ratios against stock dense of the same run); ``notes``
    a markdown file placed under the title (e.g. the commands behind the benchmark files).
    """
    from mpckv.evals.runner import META, load_results
    from mpckv.registry import list_methods

    out = Path(out).expanduser()
    img = out.parent / "img"
    records: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    images: dict[str, list[str]] = {}
    tradeoffs: list[tuple[str, str]] = []
    for d in map(Path, dirs):
        if not (d / "results.json").is_file():
            raise ConfigError(f"{d} has no results.json (run `mpckv eval --out {d}` first)")
        records += load_results(d)
        meta = common.read_json(d / META) if (d / META).is_file() else {}
        latest = {(r.get("command"), r.get("model")): r for r in meta.get("runs", []) if isinstance(r, dict)}
        runs += [dict(r, dir=str(d)) for r in latest.values()]
        for png in sorted(d.glob("plot_*.png")):
            suite = png.stem.removeprefix("plot_")
            img.mkdir(parents=True, exist_ok=True)
            target = img / f"{d.resolve().name}_{suite}.png"
            k = 2
            while target.relative_to(out.parent).as_posix() in images.get(suite, []):
                target = img / f"{d.resolve().name}-{k}_{suite}.png"
                k += 1
            shutil.copyfile(png, target)
            images.setdefault(suite, []).append(target.relative_to(out.parent).as_posix())
        if (d / "tradeoff.png").is_file():  # accuracy against cache bytes, all methods (plots.plot_tradeoff)
            img.mkdir(parents=True, exist_ok=True)
            target = img / f"{d.resolve().name}_tradeoff.png"
            shutil.copyfile(d / "tradeoff.png", target)
            tradeoffs.append((str(d), target.relative_to(out.parent).as_posix()))
    fid: list[dict[str, Any]] = []
    for f in map(Path, fidelity):
        data = common.read_json(f)
        fid += data.get("records", []) if isinstance(data, dict) else data

    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["# Results\n", f"Generated on {now} by `{command or 'mpckv report'}`.\n"]
    if notes is not None:
        parts.append(Path(notes).read_text(encoding="utf-8").strip() + "\n")
    if runs:
        parts.append("Produced by:\n")
        parts += [
            f"- `{r.get('command', '?')}` — model `{r.get('model', '?')}`, last run {r.get('date', '?')}, "
            f"{r.get('cells_total', '?')} cells (in `{r['dir']}`)"
            for r in runs
        ]
        parts.append("")
    models = sorted({r["model"] for r in records})
    parts.append(f"Models: {', '.join(f'`{m}`' for m in models) or '—'}.\n")
    parts.append("## Methods\n")
    evaluated = {r["method"] for r in records} | {r["method"] for r in fid}
    parts.append("| method | family | paper | evaluated |\n|---|---|---|---|")
    parts += [
        f"| `{m.name}` | {m.family} | {m.paper} | {'yes' if m.name in evaluated else 'not yet'} |"
        for m in list_methods()
    ]
    parts.append("\n" + LEGEND + "\n")
    for suite in _suite_order(records):
        parts.append(f"## {suite}\n")
        parts.append(suite_table(records, suite))
        parts += [f"![{suite}]({p})\n" for p in images.get(suite, [])]
    if tradeoffs:
        parts.append("## Accuracy against cache bytes\n")
        parts.append(
            "Every method of a run; x = measured cache bytes (live entries) relative to dense, one line per "
            "method through its budgets, dense at x = 1.\n"
        )
        parts += [f"`{d}`:\n\n![tradeoff {d}]({p})\n" for d, p in tradeoffs]
    if fid:
        parts.append("## Fidelity against dense\n")
        parts.append(fidelity_table(fid))
    for f in map(Path, bench):
        from mpckv.protocols.bench_secure import format_table

        recs = common.read_json(f)
        if isinstance(recs, dict) and recs.get("kind") == "bench-plaintext":  # mpckv bench plaintext
            from mpckv.evals.report_bench import plaintext_section

            parts.append(plaintext_section(recs, f, out.parent))
            continue
        from mpckv.evals.report_fusion import fusion_section, is_fusion_bench

        if is_fusion_bench(recs):  # mpckv bench fusion
            parts.append(fusion_section(recs, f))
            continue
        if not isinstance(recs, list) or not recs:
            raise ConfigError(f"{f} holds no benchmark records (write it with `mpckv bench secure --json`)")
        first = recs[0]
        parts.append(f"## Secure decoding cost ({first.get('parties')} parties, {first.get('protocol')})\n")
        parts.append(f"From `{f}`: per generated token, system totals over parties. {BENCH_LEGEND}\n")
        params = {r["method"]: r["params"] for r in recs if r.get("params")}
        if params:
            parts.append(
                "Method parameters: "
                + "; ".join(f"`{m}` {json.dumps(v, sort_keys=True)}" for m, v in sorted(params.items()))
                + ".\n"
            )
        parts.append(format_table(recs) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
