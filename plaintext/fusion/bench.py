"""``mpckv bench fusion``: TTFT, recompute ratio, store hit rate and accuracy of KV fusion vs full prefill.

For every requested length, ``n`` docqa samples (:mod:`mpckv.data.synthetic`) are split into their
documents (one :class:`~mpckv.plaintext.fusion.assemble.Chunk` each, ``--chunks`` documents) and the
question (a :class:`~mpckv.plaintext.fusion.assemble.Raw` segment). Each document is tokenized on its
own and the ids concatenated; full prefill runs on exactly the same ids. The chunk caches are computed
once into a fresh store before the timed runs (the offline warm-up of a RAG service; its time is
reported as ``precompute_s``), so the timed runs measure reuse. TTFT is the median over ``repeats``
prefills (store lookup, re-rotation, selection, recompute and the first logits); accuracy is
:func:`answer_match` of the greedy answer. Ratios are against full prefill measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpckv.data.synthetic import SEP, make_sample
from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import Chunk, Raw, Segment, compute_chunk
from mpckv.plaintext.fusion.store import ChunkKVStore, StoreStats, model_fingerprint
from mpckv.tokenizer import ByteTokenizer

BASELINES = ("full", "concat")
METHODS = ("cacheblend", "epic", "a3", "kvshare", "elasticcache", "graphkv")


@dataclass
class FusionBenchConfig:
    """One ``bench fusion`` run."""

    model: str = "tiny"
    suite: str = "docqa"
    lengths: tuple[int, ...] = (1024, 2048, 4000)
    chunks: int = 8
    n: int = 4
    recompute: float = 0.15
    methods: tuple[str, ...] = METHODS
    repeats: int = 3
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"


def split_docs(context: str) -> list[str]:
    """docqa context → its documents, each ending with the separator that follows it in the context."""
    parts = context.split("</doc>\n")
    docs = [p + "</doc>\n" for p in parts[:-1]] + [parts[-1]]
    if "".join(docs) != context:
        raise ConfigError("docqa context did not split back into its documents")
    return [d for d in docs if d]


def sample_segments(
    tokenizer: Any, model: Any, length: int, seed: int, chunks: int
) -> tuple[list[Segment], Any]:
    from mpckv.evals.common import encode

    sample = make_sample("docqa", length, seed, num_docs=chunks)
    segs: list[Segment] = []
    bos = model.config.bos_token_id
    if bos is not None and not isinstance(tokenizer, ByteTokenizer):
        segs.append(Raw([int(bos)]))
    segs.extend(Chunk(encode(tokenizer, model, d, bos=False)) for d in split_docs(sample.context))
    segs.append(Raw(encode(tokenizer, model, SEP + sample.question, bos=False)))
    return segs, sample


def answer_match(answer: str, generated: str) -> bool:
    """The greedy continuation's first line starts with the answer, not followed by a letter or digit
    (subword models continue past the value, e.g. ``" F780. The ..."``; a byte model stops at ``\\n``)."""
    line, want = generated.split("\n", 1)[0].strip(), answer.strip()
    return line.startswith(want) and not line[len(want) : len(want) + 1].isalnum()


def _prefill(engine: Any, segs: list[Segment], method: str, store: ChunkKVStore, ratio: float) -> Any:
    if method == "full":
        t0 = time.perf_counter()
        session = engine.prefill([[t for s in segs for t in s.token_ids]])
        return session, time.perf_counter() - t0, None
    params = {"ratio": ratio} if method not in ("epic", "concat") else {}
    out = engine.prefill_segments(segs, method, store=store, **params)
    return out, out.stats.ttft_s, out.stats


def run(cfg: FusionBenchConfig, out: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run the benchmark; returns one record per (length, method) and writes them as JSON to ``out``."""
    from mpckv.evals.common import load, model_id, stop_tokens
    from mpckv.plaintext.engine import Engine

    if cfg.suite != "docqa":
        raise ConfigError(f"bench fusion supports --suite docqa only, got {cfg.suite!r}")
    if cfg.chunks < 2 or cfg.n < 1 or cfg.repeats < 1:
        raise ConfigError("bench fusion needs --chunks >= 2, --n >= 1 and --repeats >= 1")
    model, tok = load(cfg.model, cfg.dtype, cfg.device)
    engine = Engine(model)
    stops = stop_tokens(tok, model)
    names = [*BASELINES, *[m for m in cfg.methods if m not in BASELINES]]
    records: list[dict[str, Any]] = []
    for length in cfg.lengths:
        store = ChunkKVStore(model_fingerprint(model), device=model.device, memory_bytes=1 << 34)
        samples = [sample_segments(tok, model, length, cfg.seed + i, cfg.chunks) for i in range(cfg.n)]
        t0 = time.perf_counter()
        for segs, _ in samples:
            for s in segs:
                if isinstance(s, Chunk):
                    store.get_or_compute(s.token_ids, lambda t: compute_chunk(model, t))
        precompute_s = time.perf_counter() - t0
        store.stats = StoreStats()
        for name in names[1:]:  # warm-up of the fused paths (precompute already ran full prefills)
            _prefill(engine, samples[0][0], name, store, cfg.recompute)
        per: dict[str, dict[str, list[float]]] = {
            m: {"ttft": [], "acc": [], "ratio": [], "frac": [], "hit": []} for m in names
        }
        for segs, sample in samples:
            answer_len = len(tok.encode(sample.answer)) + 2
            for name in names:
                times = []
                for _ in range(cfg.repeats):
                    session, ttft, stats = _prefill(engine, segs, name, store, cfg.recompute)
                    times.append(ttft)
                if stats is None:
                    gen = engine.continue_generation(session, answer_len, stop_tokens=stops).tokens[0]
                else:  # the method's own decode (KVShare refreshes rows while generating)
                    gen = session.generate(engine, answer_len, stop_tokens=stops)
                p = per[name]
                p["ttft"].append(statistics.median(times))
                p["acc"].append(float(answer_match(sample.answer, tok.decode(gen))))
                p["ratio"].append(1.0 if stats is None else stats.recompute_ratio)
                p["frac"].append(1.0 if stats is None else stats.compute_fraction)
                p["hit"].append(1.0 if stats is None else stats.hit_rate)
        tokens = statistics.mean(sum(len(s.token_ids) for s in segs) for segs, _ in samples)
        full_ttft = statistics.mean(per["full"]["ttft"])
        full_acc = statistics.mean(per["full"]["acc"])
        for name in names:
            p = per[name]
            ttft = statistics.mean(p["ttft"])
            acc = statistics.mean(p["acc"])
            records.append(
                {
                    "model": model_id(cfg.model),
                    "length_bytes": length,
                    "tokens": round(tokens, 1),
                    "chunks": cfg.chunks,
                    "n": cfg.n,
                    "method": name,
                    "ttft_s": round(ttft, 5),
                    "ttft_speedup": round(full_ttft / ttft, 3) if ttft > 0 else None,
                    "recompute_ratio": round(statistics.mean(p["ratio"]), 4),
                    "compute_fraction": round(statistics.mean(p["frac"]), 4),
                    "hit_rate": round(statistics.mean(p["hit"]), 4),
                    "accuracy": round(acc, 4),
                    "accuracy_delta": round(acc - full_acc, 4),
                    "precompute_s": round(precompute_s, 4),
                }
            )
        if progress:
            print(format_table([r for r in records if r["length_bytes"] == length]), flush=True)
    if out is not None:
        Path(out).write_text(json.dumps({"config": asdict(cfg), "records": records}, indent=2) + "\n")
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    head = f"{'len':>6} {'tokens':>7} {'method':<11} {'TTFT ms':>9} {'speedup':>8} {'recomp':>7} "
    head += f"{'compute':>8} {'hit':>5} {'acc':>5} {'Δacc':>6}"
    lines = [head]
    for r in records:
        lines.append(
            f"{r['length_bytes']:>6} {r['tokens']:>7.0f} {r['method']:<11} {1000 * r['ttft_s']:>9.1f} "
            f"{r['ttft_speedup']:>7.2f}x {r['recompute_ratio']:>7.3f} {r['compute_fraction']:>8.3f} "
            f"{r['hit_rate']:>5.2f} {r['accuracy']:>5.2f} {r['accuracy_delta']:>+6.2f}"
        )
    return "\n".join(lines)
