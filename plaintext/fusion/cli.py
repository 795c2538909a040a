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
        help="KV fusion (CacheBlend, EPIC, A³, KVShare) vs full prefill",
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
    p.add_argument("--methods", default="cacheblend,epic,a3,kvshare", help="fusion methods (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per sample; TTFT is their median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--json", metavar="FILE", help="write the records to this JSON file")
    p.set_defaults(handler=cmd_bench_fusion)
