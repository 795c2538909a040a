"""MPC subcommands: ``launch``, ``party``, ``bench secure`` and ``generate --secure`` (see :mod:`mpckv.cli`).

Examples
--------
::

    mpckv launch --parties 2 -- generate --secure --model tiny --prompt "Hi" --max-new-tokens 8 --out r.json
    mpckv launch --parties 3 --protocol replicated -- generate --secure --model tiny --prompt "Hi"
    mpckv bench secure --methods dense,streamingllm --lengths 256,512,1024,2048 --parties 2 --json b.json
    mpckv bench secure --model smollm2 --methods dense,mpcache,mpcache@all \
        --param 'mpcache@all.dense_layers=[]' --lengths 1024,4096 --steps 1 --json b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mpckv.cli_common import UsageError, _jsonable


def check_secure_support(method: str) -> None:
    """Refuse a method, or a composition with any part, that does not run under MPC (one line)."""
    from mpckv.errors import ConfigError
    from mpckv.registry import method_class

    for part in (p.strip() for p in method.split("+")):
        support = getattr(method_class(part), "secure", "no")
        if support != "yes":
            where = f" (part of {method!r})" if part != method else ""
            raise ConfigError(
                f"method {part!r}{where} does not run under MPC yet (secure support: {support}); "
                "`mpckv methods` lists the ones marked secure=yes"
            )


def check_secure_generate(args: argparse.Namespace) -> None:
    """Every check of ``generate --secure`` that needs no MPC: run before any party starts work.

    Called by ``generate --secure`` itself and, before starting or joining parties, by ``mpckv launch``
    and ``mpckv party`` (see :func:`precheck_argv`), so that a bad request fails once, in one line.
    """
    from mpckv.budget import Budget
    from mpckv.cli_common import check_budget_applies, parse_params
    from mpckv.errors import ConfigError
    from mpckv.io import check_writable
    from mpckv.registry import get_method

    check_secure_support(args.method)
    budget = Budget.parse(args.budget) if args.budget is not None else None
    check_budget_applies(args.method, budget)
    get_method(args.method, budget=budget, **parse_params(args.param))
    if args.temperature != 0.0 or args.top_k or args.top_p != 1.0:
        raise ConfigError("secure generation is greedy only (no --temperature/--top-k/--top-p)")
    if args.dtype != "float32" or args.device != "cpu":
        raise ConfigError("secure generation runs in fixed point on the CPU (no --dtype/--device)")
    if args.out is not None:
        check_writable(args.out, "--out")


def precheck_argv(argv: list[str]) -> None:
    """Validate an mpckv command line that parties will run, before any party process starts.

    Only ``generate --secure`` has checks here today; usage errors of any subcommand are reported as the
    CLI would (:class:`UsageError`, one line).
    """
    if not argv or argv[0] != "generate" or "--secure" not in argv:
        return
    from mpckv.cli import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise UsageError(f"invalid command for the parties: mpckv {' '.join(argv)}") from None
    check_secure_generate(args)


def public_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` without reading its weights (what the prompt owner, party 1, needs).

    Named models (``smollm2``, …) and ``.gguf`` files carry the tokenizer in the GGUF metadata (read
    memory-mapped; no tensor is dequantised); an HF directory has ``tokenizer.json`` or gets the byte
    tokenizer sized by its ``config.json``. The same tokenizer as plaintext ``generate``: the prompt is
    encoded as given (no chat template), so secure and plaintext runs see the same ids.
    """
    from mpckv.checkpoint import _resolve_dir
    from mpckv.config import ModelConfig
    from mpckv.gguf_loader import find_gguf
    from mpckv.models import is_model_name
    from mpckv.tokenizer import load_tokenizer

    if is_model_name(model) or find_gguf(model) is not None:
        return load_tokenizer(model, 0)  # the GGUF tokenizer; the vocabulary size is unused there
    root = _resolve_dir(model)
    return load_tokenizer(root, ModelConfig.from_file(root / "config.json").vocab_size)


def generate_secure(args: argparse.Namespace, prompt: str, budget: Any, params: dict[str, Any]) -> int:
    """The body of ``generate --secure`` inside one launched party."""
    from mpckv.errors import ConfigError
    from mpckv.protocols.secure_generate import (
        OUTPUT_PARTY,
        WEIGHT_PARTY,
        require_parties,
        run_to_json,
        secure_generate,
    )

    if args.temperature != 0.0 or args.top_k or args.top_p != 1.0:
        raise ConfigError("secure generation is greedy only (no --temperature/--top-k/--top-p)")
    if args.dtype != "float32" or args.device != "cpu":
        raise ConfigError("secure generation runs in fixed point on the CPU (no --dtype/--device)")
    rank = require_parties()
    tokenizer = ids = None
    if rank == OUTPUT_PARTY:  # the prompt owner needs the tokenizer (public), not the weights
        tokenizer = public_tokenizer(args.model)
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
    if args.out:
        from mpckv.io import write_json_atomic

        write_json_atomic(args.out, payload, "--out")
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
    """Per-token secure decode cost (bytes, rounds, modelled LAN/WAN and wall time) across local parties,
    and, for methods that evict at prefill, the one-off cost of their secure prefill eviction."""
    from mpckv.budget import Budget
    from mpckv.io import check_writable
    from mpckv.protocols.bench_secure import base_method, format_table, run_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods lists a method twice (label one: NAME@LABEL), got {args.methods!r}")
    for m in methods:
        check_secure_support(base_method(m))
    budget = Budget.parse(args.budget)
    if budget.kind not in ("ratio", "tokens"):
        raise UsageError(f"bench secure --budget takes one ratio or token count, got {args.budget!r}")
    if args.json:
        check_writable(args.json, "--json")
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
        budget=budget.value,
        params=per_method,
        prefill_lengths=_int_list(args.prefill_lengths) if args.prefill_lengths else [],
        kv_caches=_kv_caches(args.kv_cache),
        out=args.json or _tmp_json(),
    )
    print(format_table(records))
    return 0


def _kv_caches(text: str) -> list[str]:
    """``--kv-cache``: ``stock``, ``persistent``, both comma-separated, or ``both`` (= stock,persistent)."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    if out == ["both"]:
        out = ["stock", "persistent"]
    bad = [x for x in out if x not in ("stock", "persistent")]
    if not out or bad:
        raise UsageError(f"--kv-cache takes stock, persistent, both or stock,persistent, got {text!r}")
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
    p.add_argument(
        "--methods",
        default="dense",
        help="comma-separated methods that run under MPC; NAME@LABEL measures a second setting of one "
        "method (e.g. mpcache@all with --param mpcache@all.dense_layers=[])",
    )
    p.add_argument("--lengths", default="256,512,1024,2048", help="cache lengths n (comma-separated)")
    p.add_argument("--prefill-lengths", default="", help="also measure a secure prefill at these lengths")
    p.add_argument("--parties", type=int, default=2, choices=[2, 3])
    p.add_argument("--protocol", default="beaver", choices=["beaver", "replicated"])
    p.add_argument("--ttp", action="store_true", help="use a dealer process (offline traffic counted)")
    p.add_argument("--steps", type=int, default=2, help="decode steps measured per cell (default 2)")
    p.add_argument(
        "--budget",
        default="0.1",
        help="budget for non-dense methods (the rule of `generate --budget`; default 0.1)",
    )
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE")
    p.add_argument(
        "--kv-cache",
        default="stock,persistent",
        help="secure KV caches to measure: stock, persistent, both (comma-separated or the word 'both')",
    )
    p.add_argument("--json", metavar="FILE", help="write the records to this JSON file")
    p.set_defaults(handler=cmd_bench_secure)
    from mpckv.benches.cli import add_plaintext_parser

    add_plaintext_parser(kinds)
    from mpckv.plaintext.fusion.cli import add_fusion_parser

    add_fusion_parser(kinds)
