"""The ``mpckv bench fusion`` section of ``docs/RESULTS.md``: one table per model and prompt length.

A fusion bench JSON is ``{"config": {...}, "records": [...]}`` with one record per (length, method) holding
the time to first token, its ratio to full prefill of the same run, the recompute ratio, the store hit rate
and the accuracy (see :mod:`mpckv.plaintext.fusion.bench`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LEGEND = (
    "Time to first token (TTFT) with the chunk caches already in the store; *× full* = full-prefill TTFT / "
    "this TTFT in the same run (higher is faster); *recompute* = fraction of context rows recomputed after "
    "the full layers; *compute* = fraction of full-prefill work done; *hit* = store hit rate; *acc* = "
    "accuracy over the n samples and its difference to full prefill."
)


def is_fusion_bench(obj: Any) -> bool:
    """Whether ``obj`` (a parsed JSON file) is written by ``mpckv bench fusion --json``."""
    recs = obj.get("records") if isinstance(obj, dict) else None
    return bool(recs) and isinstance(recs, list) and all(isinstance(r, dict) and "ttft_s" in r for r in recs)


def _f(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) else "—"


def fusion_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the records of one (model, length)."""
    head = "| method | TTFT s | × full | recompute | compute | hit | acc | Δ acc |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    rows = [
        f"| `{r['method']}` | {_f(r.get('ttft_s'), '.3f')} | {_f(r.get('ttft_speedup'), '.2f')} | "
        f"{_f(r.get('recompute_ratio'), '.3f')} | {_f(r.get('compute_fraction'), '.3f')} | "
        f"{_f(r.get('hit_rate'), '.2f')} | {_f(r.get('accuracy'), '.2f')} | "
        f"{_f(r.get('accuracy_delta'), '+.2f')} |"
        for r in records
    ]
    return head + "\n".join(rows) + "\n"


def fusion_section(obj: dict[str, Any], path: Path) -> str:
    """The markdown section for one fusion bench file."""
    cfg = obj.get("config", {})
    parts = [
        f"## KV fusion: time to first token ({cfg.get('suite', '?')}, {cfg.get('chunks', '?')} chunks)\n"
    ]
    parts.append(
        f"From `{path}` (`--recompute {cfg.get('recompute')}`, n = {cfg.get('n')}, {cfg.get('dtype')}, "
        f"{cfg.get('device')}). {LEGEND}\n"
    )
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in obj["records"]:
        groups.setdefault((r.get("model", "?"), r.get("length_bytes")), []).append(r)
    for (model, length), recs in groups.items():
        tokens = recs[0].get("tokens")
        parts.append(f"**{model}**, {length} bytes of context (≈ {_f(tokens, '.0f')} tokens):\n")
        parts.append(fusion_table(recs))
    return "\n".join(parts)
