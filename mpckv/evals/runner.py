"""Run the evaluation grid: every suite × length × method × budget, resumable, batched per cell.

Two modes (as in kvpress):

``query-agnostic`` (default, the honest one for eviction methods)
    Prefill the context — the method compresses it at prefill, before the question exists — then feed the
    question with :meth:`~mpckv.plaintext.engine.Engine.extend` (decode steps, so decode-time methods keep
    running) and generate the answer. Samples are grouped by question length so that ``extend`` gets a
    rectangular ``[B, T]``.
``question-in-prompt``
    Prefill ``context + question`` (ragged batch) and generate.

The ``ppl`` suite prefills ``length`` bytes of held-out text and teacher-forces the next ``ppl_tokens``;
its records have ``accuracy = None`` and a ``ppl`` (``exp`` of the mean NLL over every scored token).

Outputs in ``--out``: ``results.json`` (list of records, rewritten after every cell), ``results.md``,
``predictions.jsonl`` (one line per sample), ``meta.json`` (the commands that produced the directory) and
``plot_<suite>.png``. Cells whose key (:meth:`EvalConfig.key`) is already in ``results.json`` are skipped.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.evals import common
from mpckv.evals.config import Cell, EvalConfig, cell_key
from mpckv.evals.suites import QA_SUITES, PplSample, ppl_samples, qa_samples, split_prompt

RESULTS = "results.json"
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
def _qa_cell(engine: Any, model: Any, tok: Any, cfg: EvalConfig, cell: Cell) -> dict[str, Any]:
    samples = qa_samples(cell.suite, cell.length, cfg.n, cfg.seed)
    answers = [len(common.encode(tok, model, s.answer, bos=False)) for s in samples]
    max_new = cfg.max_new_tokens or max(answers) + 2
    stops = common.stop_tokens(tok, model)
    generated: list[str] = [""] * len(samples)
    parts: list[tuple[int, dict[str, float]]] = []
    prompt_tokens = 0
    if cell.mode == "query-agnostic":
        ctx_ids, q_ids = [], []
        for s in samples:
            ctx_text, q_text = split_prompt(s)
            ctx_ids.append(common.encode(tok, model, ctx_text, bos=True))
            q_ids.append(common.encode(tok, model, q_text, bos=False))
        groups: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(q_ids):
            groups[len(ids)].append(i)
        batches = [b for g in groups.values() for b in common.chunks(g, cfg.batch_size)]
        prompt_tokens = sum(len(c) + len(q) for c, q in zip(ctx_ids, q_ids, strict=True))
    else:
        ctx_ids = [common.encode(tok, model, s.prompt, bos=True) for s in samples]
        q_ids = []
        batches = common.chunks(range(len(samples)), cfg.batch_size)
        prompt_tokens = sum(len(c) for c in ctx_ids)
    for idx in batches:
        session = engine.prefill([ctx_ids[i] for i in idx])
        if q_ids:
            engine.extend(session, torch.tensor([q_ids[i] for i in idx], dtype=torch.long))
        res = engine.continue_generation(session, max_new, stop_tokens=stops)
        for i, toks in zip(idx, res.tokens, strict=True):
            generated[i] = tok.decode(toks)
        parts.append((len(idx), common.cache_stats(session, res.stats)))
    from mpckv.data.synthetic import exact_match

    correct = [exact_match(s, g) for s, g in zip(samples, generated, strict=True)]
    preds = [
        {"i": i, "answer": s.answer, "generated": g, "correct": c}
        for i, (s, g, c) in enumerate(zip(samples, generated, correct, strict=True))
    ]
    return {
        "accuracy": sum(correct) / len(correct),
        "ppl": None,
        "max_new_tokens": max_new,
        "prompt_tokens": round(prompt_tokens / len(samples), 1),
        **common.mean_stats(parts),
        "_predictions": preds,
    }


def _ppl_cell(engine: Any, model: Any, tok: Any, cfg: EvalConfig, cell: Cell) -> dict[str, Any]:
    samples: list[PplSample] = ppl_samples(cell.length, cfg.n, cfg.seed, cfg.ppl_tokens)
    ctx_ids = [common.encode(tok, model, s.context, bos=True) for s in samples]
    cont_ids = [common.encode(tok, model, s.continuation, bos=False) for s in samples]
    t = min(len(c) for c in cont_ids)  # subword tokenisers give ragged continuations: score a common prefix
    if t < 2:
        raise ConfigError(f"the ppl continuation has only {t} token(s); raise ppl_tokens")
    nll_sum, count = 0.0, 0
    per_sample: list[float] = [0.0] * len(samples)
    parts: list[tuple[int, dict[str, float]]] = []
    for idx in common.chunks(range(len(samples)), cfg.batch_size):
        session = engine.prefill([ctx_ids[i] for i in idx])
        first = session.logits[:, None]
        target = torch.tensor([cont_ids[i][:t] for i in idx], dtype=torch.long, device=first.device)
        rest = engine.extend(session, target[:, :-1])
        logits = torch.cat([first, rest], dim=1).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, T]
        nll_sum += float(nll.sum())
        count += nll.numel()
        for i, v in zip(idx, nll.mean(dim=1).tolist(), strict=True):
            per_sample[i] = math.exp(v)
        res = engine.continue_generation(session, 0)
        parts.append((len(idx), common.cache_stats(session, res.stats)))
    return {
        "accuracy": None,
        "ppl": math.exp(nll_sum / count),
        "max_new_tokens": 0,
        "prompt_tokens": round(sum(len(c) for c in ctx_ids) / len(samples), 1),
        **common.mean_stats(parts),
        "_predictions": [{"i": i, "ppl": p} for i, p in enumerate(per_sample)],
    }


def run_cell(model: Any, tokenizer: Any, cfg: EvalConfig, cell: Cell) -> dict[str, Any]:
    """Evaluate one cell on ``cfg.n`` samples; returns the measured fields (no identity fields)."""
    from mpckv.plaintext.engine import Engine

    engine = Engine(model, cell.method, **cfg.method_params(cell.method, cell.budget))
    t0 = time.perf_counter()
    fn = _qa_cell if cell.suite in QA_SUITES else _ppl_cell
    out = fn(engine, model, tokenizer, cfg, cell)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


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

    bar = tqdm(total=len(todo), desc="eval", unit="cell", disable=not (progress and todo), dynamic_ncols=True)
    try:
        for cell in todo:
            budget = "-" if cell.budget is None else cell.budget
            bar.set_postfix_str(f"{cell.suite} L={cell.length} {cell.method} b={budget}", refresh=True)
            measured = run_cell(model, tokenizer, cfg, cell)
            rec = _record(cfg, cell, mid, measured)
            records.append(rec)
            done[cell_key(rec)] = rec
            common.write_json(out / RESULTS, records)
            _append_predictions(out, rec, measured.get("_predictions", []))
            bar.update(1)
    finally:
        bar.close()
    _write_meta(out, cfg, mid, len(todo))
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


def _write_meta(out: Path, cfg: EvalConfig, mid: str, ran: int) -> None:
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
        }
    )
    common.write_json(path, meta)
