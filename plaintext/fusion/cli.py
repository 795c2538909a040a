"""``mpckv bench fusion`` argument parsing (registered under ``mpckv bench`` by :mod:`mpckv.cli_mpc`)."""

from __future__ import annotations

import argparse
from typing import Any

from mpckv.errors import ConfigError


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(x < 64 for x in out):
        raise ConfigError(f"--lengths takes integers >= 64 (bytes per sample), got {text!r}")
    return out


def cmd_bench_fusion(args: argparse.Namespace) -> int:
    """TTFT, recompute ratio, store hit rate and accuracy of KV fusion against full prefill (same run)."""
    import torch

    from mpckv.plaintext.fusion.bench import FusionBenchConfig, run

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not 0.0 <= args.recompute <= 1.0:
        raise ConfigError(f"--recompute must lie in [0, 1], got {args.recompute}")
    cfg = FusionBenchConfig(
        model=args.model,
        suite=args.suite,
        lengths=_ints(args.lengths),
        chunks=args.chunks,
        n=args.n,
        recompute=args.recompute,
        methods=methods,
        repeats=args.repeats,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    run(cfg, out=args.json)
    return 0


def add_fusion_parser(kinds: Any) -> None:
    """Add ``fusion`` to the ``bench`` kinds."""
    p = kinds.add_parser(
        "fusion",
        help="KV fusion (CacheBlend, EPIC, A³, KVShare, Elastic-Cache, Graph-KV) vs full prefill",
        description=cmd_bench_fusion.__doc__,
    )
    p.add_argument(
        "--model", default="tiny", metavar="PATH", help="checkpoint directory, registry name or 'tiny'"
    )
    p.add_argument("--suite", default="docqa", choices=["docqa"])
    p.add_argument("--lengths", default="1024,2048,4000", help="sample lengths in bytes (comma-separated)")
    p.add_argument("--chunks", type=int, default=8, help="documents (= cached chunks) per prompt")
    p.add_argument("--n", type=int, default=4, help="samples per length")
    p.add_argument("--recompute", type=float, default=0.15, help="recompute ratio of the dynamic methods")
    p.add_argument(
        "--methods",
        default="cacheblend,epic,a3,kvshare,elasticcache,graphkv",
        help="fusion methods (comma-separated)",
    )
    p.add_argument("--repeats", type=int, default=3, help="prefills per sample; TTFT is their median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--json", metavar="FILE", help="write the records to this JSON file")
    p.set_defaults(handler=cmd_bench_fusion)
    add_agent_parser(kinds)
    add_kvsched_parser(kinds)


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>13}" for k in keys)]
    lines += ["  ".join(f"{r[k]!s:>13}" for k in keys) for r in rows]
    return "\n".join(lines)


def cmd_bench_agent(args: argparse.Namespace) -> int:
    """Simulated multi-turn agent workload: Continuum (TTL pins + program FCFS) vs LRU (JCT, hit rate)."""
    from mpckv.plaintext.fusion.agent_sim import CONTINUUM, LRU, Policy, simulate, synthetic_programs

    progs = synthetic_programs(args.programs, args.rate, seed=args.seed)
    policies = [LRU, Policy("program-fcfs", "program", 0.0), CONTINUUM]
    rows = [simulate(progs, pol, args.memory_tokens).summary() for pol in policies]
    lru = rows[0]["mean_jct_s"]
    for r in rows:
        r["jct_vs_lru"] = round(lru / r["mean_jct_s"], 3) if r["mean_jct_s"] else None
    print(_table(rows))
    cfg = {
        "programs": args.programs,
        "rate": args.rate,
        "memory_tokens": args.memory_tokens,
        "seed": args.seed,
    }
    _write_json(args.json, {"config": cfg, "agent_records": rows})
    return 0


def add_agent_parser(kinds: Any) -> None:
    p = kinds.add_parser("agent", help="Continuum TTL pinning vs LRU on a simulated agent workload")
    p.add_argument("--programs", type=int, default=150, help="agent programs in the trace")
    p.add_argument("--rate", type=float, default=0.08, help="program arrivals per second (Poisson)")
    p.add_argument("--memory-tokens", type=int, default=8000, help="KV memory for finished turns (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the summaries to this JSON file")
    p.set_defaults(handler=cmd_bench_agent)


def cmd_bench_kvsched(args: argparse.Namespace) -> int:
    """KVShare's hit-rate-ordered batching vs FCFS on a synthetic request trace (TTFT)."""
    from mpckv.plaintext.fusion.scheduler import FCFSScheduler, HitRateScheduler, simulate, synthetic_trace

    trace = synthetic_trace(args.requests, args.rate, seed=args.seed)
    rows = []
    for name, sched in (
        ("fcfs", FCFSScheduler(capacity=args.batch)),
        ("hit-rate", HitRateScheduler(capacity=args.batch)),
        ("hit-rate+age", HitRateScheduler(capacity=args.batch, age_weight=args.age_weight)),
    ):
        rows.append({"scheduler": name, **simulate(trace, sched).summary()})
    print(_table(rows))
    cfg = {"requests": args.requests, "rate": args.rate, "batch": args.batch, "seed": args.seed}
    _write_json(args.json, {"config": cfg, "sched_records": rows})
    return 0


def add_kvsched_parser(kinds: Any) -> None:
    p = kinds.add_parser("kvsched", help="KVShare cache-hit-aware scheduler vs FCFS (simulated TTFT)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=5.0, help="requests per second (Poisson)")
    p.add_argument("--batch", type=int, default=4, help="requests per batch")
    p.add_argument("--age-weight", type=float, default=0.05, help="priority bonus per second waited")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the summaries to this JSON file")
    p.set_defaults(handler=cmd_bench_kvsched)
