"""The ``mpckv`` command line.

One function per subcommand (``cmd_<name>``) registered in :func:`build_parser`; :func:`main` parses,
dispatches and turns every :class:`~mpckv.errors.MpckvError` (and every usage error) into a single line
``mpckv: error: ...`` on stderr with exit status 2.

Examples
--------
::

    mpckv methods
    mpckv generate --model tiny --method streamingllm --budget 0.25 --prompt "Hello" --max-new-tokens 32
    mpckv eval --model tiny --suite passkey,ppl --lengths 1024 --methods dense,snapkv --out runs/eval
    mpckv fidelity --model PATH --methods snapkv,quest --budgets 0.1 --synthetic passkey --length 4096
    mpckv report --results runs/eval --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from mpckv.cli_common import (  # noqa: F401  (re-exported for callers and tests)
    UsageError,
    _device,
    _fmt_bytes,
    _jsonable,
    _non_negative_int,
    _Parser,
    _read_prompt,
    check_budget_applies,
    parse_params,
)
from mpckv.errors import MpckvError

Handler = Callable[[argparse.Namespace], int]


def cmd_methods(args: argparse.Namespace) -> int:
    """List registered KV methods as a table or (``--json``) a list of objects."""
    from mpckv.registry import list_methods

    infos = list_methods()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in infos], indent=2, ensure_ascii=False))
        return 0
    header = ("name", "family", "paper", "secure")
    rows = [header] + [(m.name, m.family, m.paper, m.secure) for m in infos]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


# --------------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """Load a model, generate with one KV method, print the text (or JSON) and statistics."""
    import torch

    from mpckv.budget import Budget
    from mpckv.checkpoint import load_model
    from mpckv.errors import ConfigError
    from mpckv.io import check_writable, write_text_atomic
    from mpckv.plaintext.engine import Engine
    from mpckv.plaintext.sampling import SamplingConfig
    from mpckv.registry import get_method
    from mpckv.tokenizer import load_tokenizer

    # Cheap checks first, so that bad input fails before the model is loaded.
    prompt = _read_prompt(args)
    budget = Budget.parse(args.budget) if args.budget is not None else None
    params = parse_params(args.param)
    check_budget_applies(args.method, budget)
    method = get_method(args.method, budget=budget, **params)
    if args.out is not None:
        check_writable(args.out, "--out")  # before the run, so that a finished result is never lost
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} requested but CUDA is not available")
    if args.secure:
        from mpckv.cli_mpc import check_secure_generate, generate_secure

        check_secure_generate(args)
        return generate_secure(args, prompt, budget, params)

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(getattr(model, "source", None), model.config.vocab_size)
    ids = tokenizer.encode(prompt)
    engine = Engine(model, method)
    progress = not args.no_progress and (sys.stderr.isatty() or args.max_new_tokens > 64)
    result = engine.generate(
        [ids],
        args.max_new_tokens,
        sampling=sampling,
        stop_tokens=[] if args.ignore_eos else None,
        progress=progress,
    )
    tokens = result.tokens[0]
    stats = result.stats.to_dict()
    payload: dict[str, Any] = {
        "tokens": tokens,
        "text": tokenizer.decode(tokens),
        "method": stats.pop("method"),
        "budget": _jsonable(budget.value) if budget is not None else None,
        "finished": result.finished[0],
        **stats,
    }
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    if args.out is not None:
        write_text_atomic(args.out, text, "--out")
    if args.json:
        sys.stdout.write(text)
        return 0
    print(payload["text"])
    n_new = len(tokens)
    rate = n_new / payload["decode_s"] if payload["decode_s"] > 0 else float("inf")
    print(
        f"[{payload['method']} budget={budget if budget is not None else '-'}] "
        f"prompt {len(ids)} tok, {n_new} new tok, kept {payload['kept_fraction']:.1%} of KV "
        f"(live {_fmt_bytes(payload['live_cache_bytes'])} vs dense "
        f"{_fmt_bytes(payload['dense_cache_bytes'])}, allocated {_fmt_bytes(payload['cache_bytes'])}), "
        f"prefill {payload['prefill_s']:.3f} s, decode {payload['decode_s']:.3f} s ({rate:.1f} tok/s)",
        file=sys.stderr,
    )
    return 0


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with a KV method", description=cmd_generate.__doc__)
    p.add_argument("--model", required=True, metavar="PATH", help="HF-layout checkpoint directory, or 'tiny'")
    p.add_argument(
        "--method", default="dense", metavar="NAME", help="method name or composition 'a+b' (default: dense)"
    )
    p.add_argument(
        "--budget",
        metavar="X",
        help="kept/read budget: token count without a decimal point (256), ratio with a point or %% "
        "(0.1, 10%%, 1.0 = all), or JSON list per layer / per head",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text")
    src.add_argument(
        "--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file ('-' for stdin)"
    )
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=32, metavar="N", help="default: 32")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to this file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--device", type=_device, default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default: cpu)"
    )
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra method hyper-parameter (value parsed as JSON when possible); repeatable",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token(s)")
    p.add_argument(
        "--secure",
        action="store_true",
        help="private generation under MPC; run inside `mpckv launch --parties N -- generate --secure ...`",
    )
    p.add_argument(
        "--kv-cache",
        choices=["stock", "persistent"],
        default="persistent",
        help="secure KV cache: persistent masks (default; O(d + n) per step) or stock CrypTen re-masking",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(handler=cmd_generate)


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``mpckv`` parser; each subcommand sets ``handler`` (a ``cmd_*`` function) as a default."""
    from mpckv import __version__

    parser = _Parser(
        prog="mpckv", description="KV-cache selection, eviction and fusion, in plaintext and MPC."
    )
    parser.add_argument("--version", action="version", version=f"mpckv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("methods", help="list registered KV methods", description=cmd_methods.__doc__)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=cmd_methods)

    _add_generate(sub)
    from mpckv.cli_eval import _add_eval, _add_fidelity, _add_report
    from mpckv.cli_mpc import add_mpc_commands

    _add_eval(sub)
    _add_fidelity(sub)
    _add_report(sub)
    add_mpc_commands(sub)
    from mpckv.cli_calibrate import add_calibrate_commands

    add_calibrate_commands(sub)
    from mpckv.cli_convert import add_convert_command
    from mpckv.cli_models import add_models_command

    add_convert_command(sub)
    add_models_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Parameters
    ----------
    argv:
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except MpckvError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mpckv: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpckv: interrupted", file=sys.stderr)
        return 130
