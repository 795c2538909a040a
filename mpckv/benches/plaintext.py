"""``mpckv bench plaintext``: decode speed and memory of every method against dense and transformers.

For every prompt length ``n`` the bench runs dense, then each method × budget, then (for real
checkpoints) transformers, on the same random prompt, greedy, in one process:

* ``prefill_s`` — the prefill (with ``prefill="shared"`` one dense prefill per length is recorded and the
  methods replay their prefill hooks on it: their ``prefill_s`` is the recorded dense prefill plus their
  replay; ``"random"`` fills the cache from random K/V/Q without running the model, for decode-only
  figures at lengths whose prefill would take too long — ``prefill_s`` is then ``None``);
* ``decode_ms`` — the median time per decode step after ``warmup`` steps, and ``tokens_per_s``;
* ``parts_ms`` — the median per-step time of each part (:mod:`mpckv.plaintext.timing`): the attention
  part (``method`` hooks = scoring + selection + eviction, ``append``, ``gather``, ``attention``) apart
  from the projections and MLP (``qkv``, ``finish``, ``head``);
* cache bytes allocated and live (after the prefill and at the end), the peak resident memory of the
  process sampled during the row, and the mean entries read per step;
* ratios: ``speedup_vs_dense`` (dense decode time / this one), ``attention_speedup_vs_dense``, and
  ``vs_hf`` (this decode time / transformers').
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpckv.benches.models import BenchModel, load_bench_model
from mpckv.errors import ConfigError
from mpckv.plaintext.engine import Engine, PrefillRecord, Session
from mpckv.plaintext.tiered_store import cold_bytes_per_step
from mpckv.plaintext.timing import ATTENTION_PARTS, PARTS, PhaseTimer

__all__ = ["BenchConfig", "format_table", "run_bench"]

PREFILL_MODES = ("real", "shared", "random")


@dataclass
class BenchConfig:
    """What ``mpckv bench plaintext`` measures."""

    model: str = "tiny"
    lengths: list[int] = field(default_factory=lambda: [1024])
    methods: list[str] = field(default_factory=lambda: ["snapkv", "streamingllm", "quest", "mpcache"])
    budgets: list[float] = field(default_factory=lambda: [0.1])
    batch: int = 1
    new_tokens: int = 16
    warmup: int = 3
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    prefill: str = "shared"
    hf: str = "auto"  # "auto" (real checkpoints), "on", "off"
    seed: int = 0
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise ConfigError(f"--lengths must be integers >= 2, got {self.lengths}")
        if self.new_tokens < 2 or self.warmup < 0 or self.warmup >= self.new_tokens:
            raise ConfigError(
                f"--new-tokens ({self.new_tokens}) must be >= 2 and larger than --warmup ({self.warmup})"
            )
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.prefill not in PREFILL_MODES:
            raise ConfigError(f"--prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")
        if self.hf not in ("auto", "on", "off"):
            raise ConfigError(f"--hf must be auto, on or off, got {self.hf!r}")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"--budgets are ratios in (0, 1], got {self.budgets}")


def rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux ``/proc``; else the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_record(bm: BenchModel, n: int, batch: int, seed: int) -> PrefillRecord:
    """A synthetic prefill: N(0, 1) keys, values and queries for every layer (no model forward)."""
    cfg, m = bm.model.config, bm.model
    g = torch.Generator().manual_seed(seed)

    def rnd(heads: int) -> torch.Tensor:
        return torch.randn(batch, heads, n, cfg.head_dim, generator=g).to(dtype=m.dtype, device=m.device)

    layers = range(cfg.num_hidden_layers)
    keys, values = (
        [rnd(cfg.num_key_value_heads) for _ in layers],
        [rnd(cfg.num_key_value_heads) for _ in layers],
    )
    queries = [rnd(cfg.num_attention_heads) for _ in layers]
    lengths = torch.full((batch,), n, dtype=torch.long, device=m.device)
    logits = torch.zeros(batch, cfg.vocab_size, device=m.device)
    return PrefillRecord(lengths, keys, values, queries, logits, 0.0)


def _decode_row(engine: Engine, session: Session, cfg: BenchConfig) -> dict[str, Any]:
    timer = PhaseTimer(engine.model.device)
    engine.timers = timer
    steps: list[float] = []
    parts: list[dict[str, float]] = []
    samples = [rss_mb()]
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    try:
        for _ in range(cfg.new_tokens):
            tok = session.logits.argmax(-1)
            timer.reset()
            t0 = time.perf_counter()
            engine.decode(session, tok)
            sync()
            steps.append(time.perf_counter() - t0)
            parts.append(timer.snapshot())
            samples.append(rss_mb())
    finally:
        engine.timers = None
    timed, timed_parts = steps[cfg.warmup :], parts[cfg.warmup :]
    med = {p: 1e3 * statistics.median(x[p] for x in timed_parts) for p in PARTS}
    decode_ms = 1e3 * statistics.median(timed)
    cache = session.cache
    steps_done = max(session.step, 1)
    read = sum(session.read_sums) / (steps_done * len(session.read_sums))
    return {
        "decode_ms": decode_ms,
        "decode_steps_ms": [round(1e3 * s, 3) for s in steps],
        "tokens_per_s": cfg.batch * 1e3 / decode_ms,
        "parts_ms": {k: round(v, 4) for k, v in med.items()},
        "attention_ms": sum(med[p] for p in ATTENTION_PARTS),
        "hooks_ms": med["method"],
        "other_ms": sum(med[p] for p in PARTS if p not in ATTENTION_PARTS),
        "cache_bytes": cache.nbytes(),
        "live_cache_bytes": cache.live_bytes(),
        "rss_peak_mb": max(samples),
        "read_per_step": read,
        "cold_bytes_per_token": cold_bytes_per_step(session.states) / cfg.batch,  # offloading methods
    }


def _engine(bm: BenchModel, method: str, budget: float | None, params: dict[str, Any]) -> Engine:
    if method == "dense":
        return Engine(bm.model, "dense")
    return Engine(bm.model, method, **{**params, "budget": budget})


def _run_cell(
    bm: BenchModel, cfg: BenchConfig, method: str, budget: float | None, ids: torch.Tensor,
    record: PrefillRecord | None,
) -> dict[str, Any]:  # fmt: skip
    engine = _engine(bm, method, budget, cfg.params.get(method, {}))
    t0 = time.perf_counter()
    if record is None:
        session = engine.prefill(ids)
        prefill_s: float | None = time.perf_counter() - t0
    else:
        session = engine.prefill_from(record)
        prefill_s = None if cfg.prefill == "random" else record.seconds + time.perf_counter() - t0
    after = {
        "cache_bytes_after_prefill": session.cache.nbytes(),
        "live_after_prefill": session.cache.live_bytes(),
    }
    row = _decode_row(engine, session, cfg)
    return {"method": method, "budget": budget, "prefill_s": prefill_s, **after, **row}


def _ratios(rows: list[dict[str, Any]]) -> None:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    hf = next((r for r in rows if r["method"] == "transformers"), None)
    for r in rows:
        if dense is not None:
            r["speedup_vs_dense"] = dense["decode_ms"] / r["decode_ms"]
            if r.get("attention_ms"):
                r["attention_speedup_vs_dense"] = dense["attention_ms"] / r["attention_ms"]
        if hf is not None and hf.get("decode_ms"):
            r["vs_hf"] = r["decode_ms"] / hf["decode_ms"]
        live = r.get("live_cache_bytes")
        r["alloc_over_live"] = r["cache_bytes"] / live if live else None


def run_bench(
    cfg: BenchConfig, out: str | Path | None = None, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Run every cell, write the JSON (after each length) and return it."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    bm = load_bench_model(cfg.model, dtype, cfg.device, cfg.seed)
    use_hf = cfg.hf == "on" or (cfg.hf == "auto" and bm.has_reference)
    cells = [("dense", None)] + [(m, b) for m in cfg.methods if m != "dense" for b in cfg.budgets]
    total = len(cfg.lengths) * (len(cells) + int(use_hf))
    bar = _bar(total, progress)
    result: dict[str, Any] = {"kind": "bench-plaintext", "command": command, "config": asdict(cfg)}
    result.update(env=_env(), records=[])
    hf = None
    for n in cfg.lengths:
        gen = torch.Generator().manual_seed(cfg.seed + n)
        vocab = bm.model.config.vocab_size
        ids = torch.randint(0, vocab, (cfg.batch, n), generator=gen)
        record = None
        if cfg.prefill == "shared":
            record = Engine(bm.model, "dense").record_prefill(ids)
        elif cfg.prefill == "random":
            record = random_record(bm, n, cfg.batch, cfg.seed + n)
        rows: list[dict[str, Any]] = []
        for method, budget in cells:
            _label(bar, f"n={n} {method}")
            rows.append(_run_cell(bm, cfg, method, budget, ids, record))
            _tick(bar)
        del record
        if use_hf:
            _label(bar, f"n={n} transformers")
            from mpckv.benches.hf_baseline import hf_model, time_hf

            hf = hf if hf is not None else hf_model(bm.model)
            h = time_hf(hf, ids, cfg.new_tokens, cfg.warmup, rss=rss_mb)
            rows.append({"method": "transformers", "budget": None, **h, "live_cache_bytes": h["cache_bytes"]})
            rows[-1]["tokens_per_s"] = cfg.batch * 1e3 / h["decode_ms"]
            _tick(bar)
        _ratios(rows)
        for r in rows:
            result["records"].append({"model": cfg.model, "length": n, "batch": cfg.batch, **r})
        if out:
            Path(out).write_text(json.dumps(result, indent=1) + "\n")
    if bar is not None:
        bar.close()
    return result


def _env() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="cell")


def _label(bar: Any, text: str) -> None:
    if bar is not None:
        bar.set_postfix_str(text)


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the records (one line per length × method × budget)."""
    head = (
        f"{'n':>7} {'method':<14} {'budget':>6} {'prefill s':>9} {'ms/tok':>8} {'attn ms':>8} {'hooks':>7} "
        f"{'x dense':>7} {'attn x':>7} {'/ HF':>6} {'MB alloc':>9} {'MB live':>8} {'alloc/live':>10}"
    )
    lines = [head]

    def f(x: Any, spec: str) -> str:
        width = int(spec.split(".")[0])
        return format(x, spec) if isinstance(x, int | float) else "-".rjust(width)

    for r in result["records"]:
        lines.append(
            f"{r['length']:>7} {r['method']:<14} {f(r.get('budget'), '6.2f'):>6} "
            f"{f(r.get('prefill_s'), '9.2f')} {f(r.get('decode_ms'), '8.2f')} "
            f"{f(r.get('attention_ms'), '8.2f')} {f(r.get('hooks_ms'), '7.2f')} "
            f"{f(r.get('speedup_vs_dense'), '7.2f')} {f(r.get('attention_speedup_vs_dense'), '7.2f')} "
            f"{f(r.get('vs_hf'), '6.2f')} {f(r['cache_bytes'] / 2**20, '9.1f')} "
            f"{f((r.get('live_cache_bytes') or 0) / 2**20, '8.1f')} {f(r.get('alloc_over_live'), '10.3f')}"
        )
    return "\n".join(lines)
