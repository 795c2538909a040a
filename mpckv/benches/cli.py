"""The ``mpckv bench plaintext`` subcommand (registered by :func:`mpckv.cli_mpc.add_mpc_commands`).

Example::

    mpckv bench plaintext --model smollm2 --lengths 1024,8000 --methods snapkv,streamingllm,quest,mpcache \\
        --budgets 0.1 --new-tokens 16 --threads 1 --json bench.json
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from mpckv.cli_common import UsageError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_bench_plaintext(args: argparse.Namespace) -> int:
    """Plaintext decode time per token, its attention part, cache bytes and memory: every method against
    dense and transformers, measured in the same run."""
    from mpckv.benches.plaintext import BenchConfig, format_table, run_bench
    from mpckv.evals.config import parse_method_params
    from mpckv.registry import method_class

    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "dense"]
    for m in methods:
        method_class(m)  # unknown names fail before any model is loaded
    cfg = BenchConfig(
        model=args.model,
        lengths=_ints(args.lengths),
        methods=methods,
        budgets=_floats(args.budgets),
        batch=args.batch,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        prefill=args.prefill,
        hf=args.hf,
        seed=args.seed,
        params=parse_method_params(args.param, methods),
    )
    command = _command(args)
    result = run_bench(cfg, out=args.json, progress=not args.no_progress, command=command)
    print(format_table(result))
    if args.json:
        print(f"[bench plaintext] wrote {args.json}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args`` (recorded in the JSON and the report)."""
    argv = ["mpckv", "bench", "plaintext"]
    for key in ("model", "lengths", "methods", "budgets", "batch", "new_tokens", "warmup", "dtype", "device",
                "threads", "prefill", "hf", "seed"):  # fmt: skip
        val = getattr(args, key)
        if val is not None:
            argv += [f"--{key.replace('_', '-')}", str(val)]
    for param in args.param:
        argv += ["--param", param]
    if args.json:
        argv += ["--json", args.json]
    return shlex.join(argv)


def add_plaintext_parser(kinds: Any) -> None:
    """Add ``plaintext`` to the ``bench`` kinds."""
    p = kinds.add_parser(
        "plaintext", help="plaintext decode speed and memory vs dense and transformers",
        description=cmd_bench_plaintext.__doc__,
    )  # fmt: skip
    p.add_argument("--model", default="tiny", help="tiny, smollm2, a checkpoint dir / GGUF, or random:SPEC")
    p.add_argument("--lengths", default="1024", help="prompt lengths (comma-separated)")
    p.add_argument("--methods", default="snapkv,streamingllm,quest,mpcache", help="methods besides dense")
    p.add_argument("--budgets", default="0.1", help="ratio budgets (comma-separated)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps per cell (default 16)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median (default 3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--prefill", default="shared", choices=["real", "shared", "random"],
        help="shared: one dense prefill per length replayed by every method (default); real: one prefill "
        "per cell; random: random K/V/Q caches, no model prefill (decode-only figures)",
    )  # fmt: skip
    p.add_argument("--hf", default="auto", choices=["auto", "on", "off"], help="the transformers row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE")
    p.add_argument("--json", metavar="FILE", help="write the records to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_bench_plaintext)
