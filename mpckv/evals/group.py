"""Evaluate all cells of one ``(suite, length)`` on shared dense prefills.

Eviction at prefill runs after each layer's dense attention, so it does not change the prefill forward:
for every sample batch, one dense prefill is recorded (:meth:`~mpckv.plaintext.engine.Engine.record_prefill`)
and each ``(method, budget)`` cell replays its prefill hooks on it
(:meth:`~mpckv.plaintext.engine.Engine.prefill_from`), then feeds the question and generates (QA) or
teacher-forces the continuation (``ppl``). A method that declares ``changes_prefill`` (or a composition
with such a part) gets its own :meth:`~mpckv.plaintext.engine.Engine.prefill`. Replaying gives the same
tokens, logits and caches as a per-method prefill (``tests/test_shared_prefill.py``), so results do not
depend on whether a cell ran alone or with others.

Work is done batch by batch; every finished ``(cell, batch)`` part is handed to ``on_part`` (the runner
appends it to ``partial.jsonl``) and parts passed in ``done_parts`` are not recomputed, so an interrupted
run loses at most the batch in progress.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.evals import common
from mpckv.evals.config import Cell, EvalConfig
from mpckv.evals.record_store import RecordStore, record_key
from mpckv.evals.scoring import score
from mpckv.evals.suites import QA_SUITES, natural_tasks, prepare_ppl, prepare_qa

Part = dict[str, Any]


@dataclass
class Job:
    """One cell of the group: its resume key, its engine and the batch parts done so far."""

    cell: Cell
    key: str
    engine: Any
    parts: dict[tuple[int, ...], Part] = field(default_factory=dict)

    @property
    def shares_prefill(self) -> bool:
        return shares_prefill(self.engine.method)


def shares_prefill(method: Any) -> bool:
    """Whether ``method`` (or every part of a composition) leaves the prefill forward to a shared record."""
    parts = getattr(method, "parts", None) or []
    return not any(getattr(p, "changes_prefill", False) for p in [method, *parts])


@dataclass
class _Plan:
    """Token ids of the group's samples and how they are batched."""

    prefill: list[list[int]]
    feed: list[list[int]] | None  # fed after the prefill (question, or ppl continuation); None = nothing
    batches: list[list[int]]
    qa: Any = None  # list[Prepared] for QA suites
    max_new: int = 0
    stops: list[int] = field(default_factory=list)


def stop_tokens(tokenizer: Any, model: Any) -> list[int]:
    """Byte tokenizer: EOS and newline (answers are one line). Real tokenizers: the model's and the
    tokenizer's stop tokens (end of turn), not newline — a chat answer may span lines."""
    if not natural_tasks(tokenizer):
        return common.stop_tokens(tokenizer, model)
    extra = getattr(tokenizer, "stop_token_ids", None) or []
    return sorted(set(model.config.stop_token_ids) | {int(t) for t in extra})


def batch_size(cfg: EvalConfig, tokenizer: Any) -> int:
    """``cfg.batch_size`` or, when ``None``, all samples at once for the byte tokenizer and 4 otherwise
    (a recorded prefill holds every layer's queries: ~0.35 GB per 4K-token sample of a 0.5B model)."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    return 0 if not natural_tasks(tokenizer) else 4


def _plan(model: Any, tok: Any, cfg: EvalConfig, suite: str, length: int) -> _Plan:
    size = batch_size(cfg, tok)
    if suite in QA_SUITES:
        qa = prepare_qa(suite, length, cfg.n, cfg.seed, tok, model)
        max_new = cfg.max_new_tokens or max(s.max_new_tokens for s in qa)
        stops = stop_tokens(tok, model)
        if cfg.mode == "query-agnostic":
            groups: dict[int, list[int]] = defaultdict(list)  # extend needs a rectangular [B, T]
            for i, s in enumerate(qa):
                groups[len(s.suffix_ids)].append(i)
            batches = [b for g in groups.values() for b in common.chunks(g, size)]
            return _Plan([s.prefix_ids for s in qa], [s.suffix_ids for s in qa], batches, qa, max_new, stops)
        ids = [s.prefix_ids + s.suffix_ids for s in qa]
        return _Plan(ids, None, common.chunks(range(len(qa)), size), qa, max_new, stops)
    pairs = prepare_ppl(length, cfg.n, cfg.seed, cfg.ppl_tokens, tok, model)
    t = min(len(c) for _, c in pairs)  # subword tokenisers give ragged continuations: score a common prefix
    if t < 2:
        raise ConfigError(f"the ppl continuation has only {t} token(s); raise ppl_tokens")
    return _Plan([c for c, _ in pairs], [c[:t] for _, c in pairs], common.chunks(range(len(pairs)), size))


def _qa_part(job: Job, session: Any, plan: _Plan, idx: list[int], tok: Any) -> Part:
    eng = job.engine
    if plan.feed is not None:
        eng.extend(session, torch.tensor([plan.feed[i] for i in idx], dtype=torch.long), logits="last")
    res = eng.continue_generation(session, plan.max_new, stop_tokens=plan.stops)
    return {
        "generated": [tok.decode(t) for t in res.tokens],
        "stats": common.cache_stats(session, res.stats),
    }


def _ppl_part(job: Job, session: Any, plan: _Plan, idx: list[int]) -> Part:
    assert plan.feed is not None
    eng = job.engine
    first = session.logits[:, None]
    target = torch.tensor([plan.feed[i] for i in idx], dtype=torch.long, device=first.device)
    rest = eng.extend(session, target[:, :-1])
    logits = torch.cat([first, rest], dim=1).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, T]
    res = eng.continue_generation(session, 0)
    return {
        "nll_sum": float(nll.sum()),
        "count": int(nll.numel()),
        "ppl": [math.exp(v) for v in nll.mean(dim=1).tolist()],
        "stats": common.cache_stats(session, res.stats),
    }


def _finish(job: Job, plan: _Plan) -> dict[str, Any]:
    """The measured fields of a cell from its parts (one per batch)."""
    parts = [(b, job.parts[tuple(b)]) for b in plan.batches]
    stats = common.mean_stats([(len(b), p["stats"]) for b, p in parts])
    prompt_tokens = sum(len(plan.prefill[i]) + (len(plan.feed[i]) if plan.qa and plan.feed else 0)
                        for b, _ in parts for i in b)  # fmt: skip
    out: dict[str, Any] = {
        "prompt_tokens": round(prompt_tokens / max(1, len(plan.prefill)), 1),
        **stats,
        "seconds": round(sum(p["seconds"] for _, p in parts), 3),
        "shared_prefill": job.shares_prefill,
    }
    if plan.qa is None:
        per = [0.0] * len(plan.prefill)
        for b, p in parts:
            for i, v in zip(b, p["ppl"], strict=True):
                per[i] = v
        nll = sum(p["nll_sum"] for _, p in parts) / sum(p["count"] for _, p in parts)
        out |= {"accuracy": None, "ppl": math.exp(nll), "max_new_tokens": 0}
        out["_predictions"] = [{"i": i, "ppl": v} for i, v in enumerate(per)]
        return out
    gen = [""] * len(plan.qa)
    for b, p in parts:
        for i, g in zip(b, p["generated"], strict=True):
            gen[i] = g
    scores = [score(g, s.answers, s.metric) for g, s in zip(gen, plan.qa, strict=True)]
    n = len(scores)
    out |= {
        "accuracy": sum(s.primary for s in scores) / n,
        "accuracy_contains": sum(s.contains for s in scores) / n,
        "accuracy_exact": sum(s.exact for s in scores) / n,
        "metric": plan.qa[0].metric,
        "ppl": None,
        "max_new_tokens": plan.max_new,
    }
    out["_predictions"] = [
        {
            "i": i,
            "prompt_tail": s.prompt_tail,
            "answer": s.answer,
            "generated": g,
            "score": sc.primary,
            "contains": sc.contains,
            "exact": sc.exact,
            "correct": sc.primary == 1.0,
        }
        for i, (s, g, sc) in enumerate(zip(plan.qa, gen, scores, strict=True))
    ]
    return out


def _recorded(dense: Any, ids: list[list[int]], store: RecordStore, cfg: EvalConfig, model_id: str) -> Any:
    """The batch's dense prefill from ``--prefill-cache`` (recorded and stored when it is not there yet)."""
    key = record_key(model_id, cfg.dtype, cfg.device, ids)
    record = store.load(key)
    if record is None:
        record = dense.record_prefill(ids)
        store.save(key, record)
    return record


def run_group(
    model: Any,
    tok: Any,
    cfg: EvalConfig,
    jobs: Sequence[Job],
    *,
    on_part: Callable[[Job, list[int], Part], None] | None = None,
    progress: Callable[[int], None] | None = None,
    model_id: str = "",
) -> Iterator[tuple[Job, dict[str, Any]]]:
    """Run ``jobs`` (cells of one suite and length) batch by batch; yield ``(job, measured)`` per finished
    cell. ``job.parts`` may hold parts of an earlier, interrupted run (keyed by the batch's indices)."""
    from mpckv.plaintext.engine import Engine

    if not jobs:
        return
    suites = {(j.cell.suite, j.cell.length) for j in jobs}
    if len(suites) != 1:
        raise ConfigError(f"run_group takes the cells of one suite and length, got {sorted(suites)}")
    suite, length = next(iter(suites))
    plan = _plan(model, tok, cfg, suite, length)
    wanted = {tuple(b) for b in plan.batches}
    for job in jobs:  # parts of another batching (a different --batch-size) cannot be reused
        job.parts = {k: v for k, v in job.parts.items() if k in wanted}
        if progress is not None and job.parts:
            progress(sum(len(k) for k in job.parts))
    dense = Engine(model, "dense")
    store = RecordStore(cfg.prefill_cache) if cfg.prefill_cache else None
    for idx in plan.batches:
        pending = [j for j in jobs if tuple(idx) not in j.parts]
        if not pending:
            continue
        ids = [plan.prefill[i] for i in idx]
        record = None
        if any(j.shares_prefill for j in pending):
            record = _recorded(dense, ids, store, cfg, model_id) if store else dense.record_prefill(ids)
        for job in pending:
            t0 = time.perf_counter()
            if record is not None and job.shares_prefill:
                session = job.engine.prefill_from(record)
                shared_s = record.seconds
            else:
                session, shared_s = job.engine.prefill(ids), 0.0
            if plan.qa is not None:
                part = _qa_part(job, session, plan, idx, tok)
            else:
                part = _ppl_part(job, session, plan, idx)
            part["seconds"] = time.perf_counter() - t0 + shared_s
            del session
            job.parts[tuple(idx)] = part
            if on_part is not None:
                on_part(job, idx, part)
            if progress is not None:
                progress(len(idx))
        del record
    for job in jobs:
        yield job, _finish(job, plan)
