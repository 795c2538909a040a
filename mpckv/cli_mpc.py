"""MPC subcommands: ``launch``, ``party``, ``bench secure`` and ``generate --secure`` (see :mod:`mpckv.cli`).

Examples
--------
::

    mpckv launch --parties 2 -- generate --secure --model tiny --prompt "Hi" --max-new-tokens 8 --out r.json
    mpckv launch --parties 3 --protocol replicated -- generate --secure --model tiny --prompt "Hi"
    mpckv bench secure --methods dense,streamingllm --lengths 256,512,1024,2048 --parties 2 --json b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mpckv.cli_common import UsageError, _jsonable


def generate_secure(args: argparse.Namespace, prompt: str, budget: Any, params: dict[str, Any]) -> int:
    """The body of ``generate --secure`` inside one launched party."""
    from mpckv.config import ModelConfig
    from mpckv.errors import ConfigError
    from mpckv.protocols.secure_generate import (
        OUTPUT_PARTY,
        WEIGHT_PARTY,
        require_parties,
        run_to_json,
        secure_generate,
        write_output,
    )
    from mpckv.tokenizer import load_tokenizer

    if args.temperature != 0.0 or args.top_k or args.top_p != 1.0:
        raise ConfigError("secure generation is greedy only (no --temperature/--top-k/--top-p)")
    if args.dtype != "float32" or args.device != "cpu":
        raise ConfigError("secure generation runs in fixed point on the CPU (no --dtype/--device)")
    rank = require_parties()
    tokenizer = ids = None
    if rank == OUTPUT_PARTY:  # the prompt owner needs the tokenizer (public), not the weights
        from mpckv.checkpoint import _resolve_dir

        root = _resolve_dir(args.model)
        config = ModelConfig.from_file(root / "config.json")
        tokenizer = load_tokenizer(root, config.vocab_size)
        ids = tokenizer.encode(prompt)
    if budget is not None:
        params = {**params, "budget": budget}
    model_path = args.model if rank == WEIGHT_PARTY else None
    run = secure_generate(model_path, ids, args.max_new_tokens, args.method, params, kv_cache=args.kv_cache)
    if rank != OUTPUT_PARTY:
        return 0
    assert tokenizer is not None and run.tokens is not None
    payload = run_to_json(
        run,
        tokenizer.decode(run.tokens),
        args.method,
        _jsonable(budget.value) if budget is not None else None,
    )
    write_output(payload, args.out)
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        c = payload["comm"]
        print(payload["text"])
        print(
            f"[secure {args.method}] {len(run.tokens)} tokens in {payload['wall_s']:.2f} s; "
            f"{c['bytes_total'] / 2**20:.2f} MiB, {c['rounds']} rounds "
            f"(modelled LAN {c['modelled']['lan_s']:.2f} s, WAN {c['modelled']['wan_s']:.2f} s)",
            file=sys.stderr,
        )
    return 0


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise UsageError(f"expected positive integers, got {text!r}")
    return out


def cmd_bench_secure(args: argparse.Namespace) -> int:
    """Per-token secure decode cost (bytes, rounds, modelled LAN/WAN and wall time) across local parties."""
    from mpckv.errors import ConfigError
    from mpckv.protocols.bench_secure import format_table, run_bench
    from mpckv.registry import method_class

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        cls = method_class(m)
        support = getattr(cls, "secure", "no")
        if support != "yes":
            raise ConfigError(f"method {m!r} does not run under MPC yet (secure support: {support})")
    from mpckv.evals.config import parse_method_params

    per_method = parse_method_params(args.param, methods)
    records = run_bench(
        args.model,
        methods,
        _int_list(args.lengths),
        parties=args.parties,
        protocol=args.protocol,
        ttp=args.ttp,
        steps=args.steps,
        budget=args.budget,
        params=per_method,
        prefill_lengths=_int_list(args.prefill_lengths) if args.prefill_lengths else [],
        kv_caches=_kv_caches(args.kv_cache),
        out=args.json or _tmp_json(),
    )
    print(format_table(records))
    return 0


def _kv_caches(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in ("stock", "persistent")]
    if not out or bad:
        raise UsageError(f"--kv-cache takes stock, persistent or both (comma-separated), got {text!r}")
    return out


def _tmp_json() -> str:
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="mpckv-bench-", suffix=".json")
    os.close(fd)
    return path


def add_mpc_commands(sub: Any) -> None:
    """Register ``launch``, ``party`` and ``bench`` on the top-level subparsers."""
    from mpckv.protocols.launcher import add_launch_parser, add_party_parser

    add_launch_parser(sub)
    add_party_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks (ratios against dense measured in the same run)")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    p = kinds.add_parser(
        "secure", help="per-token cost of private decoding", description=cmd_bench_secure.__doc__
    )
    p.add_argument("--model", default="tiny", metavar="PATH", help="checkpoint directory or 'tiny'")
    p.add_argument("--methods", default="dense", help="comma-separated methods that run under MPC")
    p.add_argument("--lengths", default="256,512,1024,2048", help="cache lengths n (comma-separated)")
    p.add_argument("--prefill-lengths", default="", help="also measure a secure prefill at these lengths")
    p.add_argument("--parties", type=int, default=2, choices=[2, 3])
    p.add_argument("--protocol", default="beaver", choices=["beaver", "replicated"])
    p.add_argument("--ttp", action="store_true", help="use a dealer process (offline traffic counted)")
    p.add_argument("--steps", type=int, default=2, help="decode steps measured per cell (default 2)")
    p.add_argument("--budget", type=float, default=0.1, help="budget for non-dense methods (default 0.1)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE")
    p.add_argument(
        "--kv-cache",
        default="stock,persistent",
        help="secure KV caches to measure: stock, persistent or both",
    )
    p.add_argument("--json", metavar="FILE", help="write the records to this JSON file")
    p.set_defaults(handler=cmd_bench_secure)
