"""Run the evaluation grid: every suite × length × method × budget, resumable, on shared prefills.

For each ``(suite, length)`` the samples are prepared once (:mod:`mpckv.evals.suites`: byte-sized
synthetic tasks for the byte-level tiny model, token-sized chat-templated RULER tasks for real models) and
every missing ``(method, budget)`` cell runs batch by batch on one shared dense prefill per batch
(:mod:`mpckv.evals.group`). Two modes (as in kvpress):

``query-agnostic`` (default, the honest one for eviction methods)
    Prefill the context — the method compresses it at prefill, before the question exists — then feed the
    question (for chat models: question, end of turn, assistant header and answer cue) with
    :meth:`~mpckv.plaintext.engine.Engine.extend` (decode steps, so decode-time methods keep running) and
    generate the answer. Samples are grouped by question length so that ``extend`` gets a rectangular
    ``[B, T]``.
``question-in-prompt``
    Prefill ``context + question`` (ragged batch) and generate.

The ``ppl`` suite prefills ``length`` tokens of held-out text and teacher-forces the next ``ppl_tokens``;
its records have ``accuracy = None`` and a ``ppl`` (``exp`` of the mean NLL over every scored token).

QA records carry ``accuracy`` (the suite's metric: RULER containment for real models, first-line exact
match for the byte-level model), ``accuracy_contains`` and ``accuracy_exact``
(:mod:`mpckv.evals.scoring`). ``seconds`` is a cell's own compute plus the shared dense prefill it used
(what the cell would cost alone); ``meta.json`` has the wall time of each run.

Outputs in ``--out``: ``results.json`` (list of records, rewritten after every cell), ``results.md``,
``predictions.jsonl`` (one line per sample: prompt tail, generation, expected answer, both scores),
``meta.json`` (the commands that produced the directory), ``plot_<suite>.png`` and, while cells are
unfinished, ``partial.jsonl`` (finished sample batches). Cells whose key (:meth:`EvalConfig.key`) is already
in ``results.json`` are skipped; the batches of an interrupted cell found in ``partial.jsonl`` are reused,
so a crash loses at most the batch in progress.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

from mpckv.errors import ConfigError
from mpckv.evals import common
from mpckv.evals.config import Cell, EvalConfig, cell_key
from mpckv.evals.group import Job, run_group

RESULTS = "results.json"
PARTIAL = "partial.jsonl"
META = "meta.json"
PREDICTIONS = "predictions.jsonl"


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """The records in ``out/results.json`` (``[]`` when absent)."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    records = common.read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path} is not a list of result records")
    return records


# ---------------------------------------------------------------------------------------------- cells
def _jobs(model: Any, cfg: EvalConfig, cells: list[Cell], mid: str) -> list[Job]:
    from mpckv.plaintext.engine import Engine

    return [
        Job(c, cfg.key(c, mid), Engine(model, c.method, **cfg.method_params(c.method, c.budget)))
        for c in cells
    ]


def run_cell(model: Any, tokenizer: Any, cfg: EvalConfig, cell: Cell) -> dict[str, Any]:
    """Evaluate one cell on ``cfg.n`` samples; returns the measured fields (no identity fields)."""
    jobs = _jobs(model, cfg, [cell], "cell")
    return next(iter(run_group(model, tokenizer, cfg, jobs)))[1]


# ---------------------------------------------------------------------------------------------- grid
def _record(cfg: EvalConfig, cell: Cell, mid: str, measured: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "suite": cell.suite,
        "length": cell.length,
        "method": cell.method,
        "budget": cell.budget,
        "mode": cell.mode,
        "n": cfg.n,
        "seed": cfg.seed,
        "model": mid,
        "params": cfg.params.get(cell.method, {}),
    }
    rec.update({k: v for k, v in measured.items() if not k.startswith("_")})
    return rec


def run_eval(
    cfg: EvalConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_id: str | None = None,
    progress: bool = False,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate every missing cell of ``cfg`` and write the output files; returns all records of the run.

    Parameters
    ----------
    cfg:
        The grid and options.
    model, tokenizer:
        An already loaded model (and tokenizer); by default ``cfg.model`` is loaded, and only when some
        cell is missing.
    model_id:
        The model's id in result keys; by default :func:`mpckv.evals.common.model_id` of ``cfg.model``.
    progress:
        Show a tqdm bar over cells.
    plots:
        Write the PNG plots (needs matplotlib).
    """
    out = Path(cfg.out).expanduser()
    mid = model_id or common.model_id(cfg.model)
    records = load_results(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {out}: {exc}") from exc
    done = {cell_key(r): r for r in records}
    cells = cfg.cells()
    todo = [c for c in cells if cfg.key(c, mid) not in done]
    if todo and model is None:
        model, tokenizer = common.load(cfg.model, cfg.dtype, cfg.device)
    if todo and tokenizer is None:
        from mpckv.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(getattr(model, "source", None), model.config.vocab_size)
    from tqdm.auto import tqdm

    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in todo:
        groups.setdefault((c.suite, c.length), []).append(c)
    partial = _read_partial(out, {cfg.key(c, mid) for c in todo})
    total = len(todo) * cfg.n
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not (progress and todo), dynamic_ncols=True)
    t_run = time.perf_counter()

    def on_part(job: Job, idx: list[int], part: dict[str, Any]) -> None:
        line = json.dumps({"key": job.key, "batch": idx, "part": part}, ensure_ascii=False)
        with (out / PARTIAL).open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    try:
        for (suite, length), group in groups.items():
            bar.set_postfix_str(f"{suite} L={length}: {len(group)} cells", refresh=True)
            jobs = _jobs(model, cfg, group, mid)
            for job in jobs:
                job.parts = partial.get(job.key, {})
            for job, measured in run_group(
                model, tokenizer, cfg, jobs, on_part=on_part, progress=bar.update, model_id=mid
            ):
                rec = _record(cfg, job.cell, mid, measured)
                records.append(rec)
                done[cell_key(rec)] = rec
                common.write_json(out / RESULTS, records)
                _append_predictions(out, rec, measured.get("_predictions", []))
            _drop_partial(out, {j.key for j in jobs})
    finally:
        bar.close()
    _write_meta(out, cfg, mid, len(todo), time.perf_counter() - t_run)
    mine = [done[cfg.key(c, mid)] for c in cells]
    common.write_json(out / RESULTS, records)
    from mpckv.evals.report import results_markdown

    (out / "results.md").write_text(results_markdown(records), encoding="utf-8")
    if plots:
        from mpckv.evals.plots import plot_results

        plot_results(records, out)
    return mine


def _append_predictions(out: Path, rec: dict[str, Any], preds: list[dict[str, Any]]) -> None:
    key = {k: rec[k] for k in ("suite", "length", "method", "budget", "mode", "n", "seed", "model")}
    with (out / PREDICTIONS).open("a", encoding="utf-8") as fh:
        for p in preds:
            fh.write(json.dumps({**key, **p}, ensure_ascii=False) + "\n")


def _read_partial(out: Path, keys: set[str]) -> dict[str, dict[tuple[int, ...], dict[str, Any]]]:
    """Batch parts of unfinished cells from ``partial.jsonl`` (a torn last line is ignored)."""
    path = out / PARTIAL
    found: dict[str, dict[tuple[int, ...], dict[str, Any]]] = {}
    if not path.exists():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and item.get("key") in keys:
            found.setdefault(item["key"], {})[tuple(item["batch"])] = item["part"]
    return found


def _drop_partial(out: Path, keys: set[str]) -> None:
    """Remove the parts of finished cells from ``partial.jsonl`` (the file goes when empty)."""
    path = out / PARTIAL
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("key") not in keys:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    if keep:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join(keep) + "\n", encoding="utf-8")
        tmp.replace(path)
    else:
        path.unlink()


def _write_meta(out: Path, cfg: EvalConfig, mid: str, ran: int, seconds: float) -> None:
    path = out / META
    meta = common.read_json(path) if path.exists() else {"runs": []}
    if not isinstance(meta, dict) or not isinstance(meta.get("runs"), list):
        meta = {"runs": []}
    meta["runs"].append(
        {
            "command": cfg.command or "(python API)",
            "model": mid,
            "model_path": str(cfg.model),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cells_run": ran,
            "cells_total": len(cfg.cells()),
            "seconds": round(seconds, 1),
        }
    )
    common.write_json(path, meta)
