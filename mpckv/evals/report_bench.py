"""The ``mpckv bench plaintext`` section of ``docs/RESULTS.md``: tables per length and a decode-time plot.

:func:`plaintext_section` turns one bench JSON (``{"kind": "bench-plaintext", "config", "env",
"records"}``) into markdown; :func:`plot_decode_vs_length` draws decode ms/token against the prompt length,
one line per method × budget (needs matplotlib; without it the section has no figure).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KIND = "bench-plaintext"
LEGEND = (
    "Per decode token (median after the warm-up steps), batch as given, greedy, random prompt. "
    "*attention* = the method's hooks (scoring, selection, eviction) + appending the new K/V + gathering "
    "the selected entries + the attention itself; the rest of a step is projections, MLP and logits. "
    "*× dense* = dense time / this time (higher is faster); *attn × dense* the same for the attention part; "
    "*/ HF* = this time / transformers' (SDPA, default cache) in the same run (lower is faster). "
    "*alloc/live* = allocated cache bytes (capacity, positions and metadata included) / live K/V bytes. "
    "*read* = mean entries read per decode step and KV head (over layers). Prefill with `prefill=shared`: "
    "one dense prefill per length, replayed by each method's hooks (its time included); `random`: synthetic "
    "K/V/Q caches, no prefill time."
)


def _f(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) else "—"


def _label(r: dict[str, Any]) -> str:
    return r["method"] if r.get("budget") is None else f"{r['method']} {r['budget']:g}"


def length_table(records: Sequence[dict[str, Any]], length: int) -> str:
    """Markdown table of the records of one prompt length."""
    head = (
        "| method | prefill s | ms/token | tok/s | attention ms | hooks ms | × dense | attn × dense | / HF "
        "| cache MB (alloc / live) | alloc/live | peak RSS MB | read |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in (r for r in records if int(r["length"]) == length):
        mb = f"{r['cache_bytes'] / 2**20:.1f} / {(r.get('live_cache_bytes') or 0) / 2**20:.1f}"
        lines.append(
            f"| {_label(r)} | {_f(r.get('prefill_s'), '.2f')} | {_f(r.get('decode_ms'), '.2f')} "
            f"| {_f(r.get('tokens_per_s'), '.2f')} | {_f(r.get('attention_ms'), '.2f')} "
            f"| {_f(r.get('hooks_ms'), '.2f')} | {_f(r.get('speedup_vs_dense'), '.2f')} "
            f"| {_f(r.get('attention_speedup_vs_dense'), '.2f')} | {_f(r.get('vs_hf'), '.2f')} | {mb} "
            f"| {_f(r.get('alloc_over_live'), '.3f')} | {_f(r.get('rss_peak_mb'), '.0f')} "
            f"| {_f(r.get('read_per_step'), '.0f')} |"
        )
    return "\n".join(lines)


def plot_decode_vs_length(
    records: Sequence[dict[str, Any]], path: str | Path, title: str = ""
) -> Path | None:
    """Decode ms/token against the prompt length (log-log), one line per method × budget."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the eval extra
        log.warning("matplotlib is missing: no decode-time plot")
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if isinstance(r.get("decode_ms"), int | float):
            series.setdefault(_label(r), []).append((int(r["length"]), float(r["decode_ms"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts.sort()
        style = "--" if name in ("dense", "transformers") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plaintext_section(data: dict[str, Any], source: str | Path, out_dir: str | Path) -> str:
    """Markdown of one ``mpckv bench plaintext --json`` file; the plot goes to ``out_dir/img/``."""
    cfg, env, records = data.get("config", {}), data.get("env", {}), data.get("records", [])
    title = (
        f"{cfg.get('model')} · {cfg.get('dtype')} · batch {cfg.get('batch')} · threads {env.get('threads')}"
    )
    parts = [f"## Plaintext decoding speed — `{cfg.get('model')}`\n"]
    parts.append(
        f"From `{source}` ({env.get('time_utc', '?')}, torch {env.get('torch', '?')}, {env.get('threads')} "
        f"thread(s), {env.get('cpu_count')} CPUs; prefill `{cfg.get('prefill')}`, {cfg.get('new_tokens')} "
        f"decode steps, {cfg.get('warmup')} warm-up)."
        + (f" Command: `{data['command']}`." if data.get("command") else "")
        + "\n"
    )
    parts.append(LEGEND + "\n")
    for n in sorted({int(r["length"]) for r in records}):
        parts.append(f"### n = {n}\n")
        parts.append(length_table(records, n) + "\n")
    img = Path(out_dir) / "img" / f"bench_plaintext_{Path(source).stem}.png"
    png = plot_decode_vs_length(records, img, title)
    if png is not None:
        parts.append(f"![decode time vs length]({png.relative_to(Path(out_dir)).as_posix()})\n")
    return "\n".join(parts)
