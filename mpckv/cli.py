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
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mpckv.errors import MpckvError

Handler = Callable[[argparse.Namespace], int]


class UsageError(MpckvError):
    """Bad command-line input that argparse cannot catch (files, ``--param`` syntax, ...)."""


class _Parser(argparse.ArgumentParser):
    """Argument parser whose usage errors are one line, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(2, f"mpckv: error: {message}{hint}\n")


# ---------------------------------------------------------------------------------------------- helpers
def _device(text: str) -> str:
    """argparse type for ``--device``: ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; use cpu, cuda or cuda:N")
    return text


def _non_negative_int(text: str) -> int:
    """argparse type for counts such as ``--max-new-tokens``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["window=16", "pooling=avg"]`` into ``{"window": 16, "pooling": "avg"}``.

    Parameters
    ----------
    items:
        ``key=value`` strings; values are decoded as JSON when possible, else kept as strings.

    Returns
    -------
    dict
        Method hyper-parameters for :func:`mpckv.get_method`.

    Raises
    ------
    UsageError
        On a missing ``=``, an invalid or repeated key, or ``budget`` (use ``--budget``).
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--param expects key=value with a Python identifier as key, got {item!r}")
        if key == "budget":
            raise UsageError("give the budget with --budget, not --param budget=...")
        if key in params:
            raise UsageError(f"--param {key} given more than once")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return str(args.prompt)
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file).expanduser()
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc}") from exc


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - unreachable


def _jsonable(value: Any) -> Any:
    """Tuples (per-layer / per-head budgets) become lists."""
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- methods
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
    from mpckv.plaintext.engine import Engine
    from mpckv.plaintext.sampling import SamplingConfig
    from mpckv.registry import get_method
    from mpckv.tokenizer import load_tokenizer

    # Cheap checks first, so that bad input fails before the model is loaded.
    prompt = _read_prompt(args)
    budget = Budget.parse(args.budget) if args.budget is not None else None
    params = parse_params(args.param)
    method = get_method(args.method, budget=budget, **params)
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} requested but CUDA is not available")

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
        out = Path(args.out).expanduser()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {out}: {exc}") from exc
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
        help="kept/read budget: ratio in (0, 1] (0.1), token count (256), or JSON list per layer / per head",
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
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(handler=cmd_generate)


# ------------------------------------------------------------------------------------------------- eval
def _max_new_tokens(text: str) -> int | None:
    """argparse type for ``--max-new-tokens``: ``auto`` (None) or a positive integer."""
    if text == "auto":
        return None
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1 or auto")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate methods × budgets on synthetic long-context suites and held-out perplexity.

    Writes OUT/results.json, OUT/results.md, OUT/predictions.jsonl, OUT/meta.json and OUT/plot_<suite>.png;
    cells already in OUT/results.json (same suite, length, method, budget, mode, n, seed, model and
    parameters) are skipped.
    """
    from mpckv.evals.config import EvalConfig, parse_method_params, parse_methods
    from mpckv.evals.runner import META, run_eval

    methods = parse_methods(args.methods)
    cfg = EvalConfig(
        model=args.model,
        out=args.out,
        suites=args.suite,
        lengths=args.lengths,
        methods=methods,
        budgets=args.budgets,
        n=args.n,
        seed=args.seed,
        mode=args.mode,
        params=parse_method_params(args.param, methods),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        ppl_tokens=args.ppl_tokens,
        dtype=args.dtype,
        device=args.device,
    )
    cfg.command = cfg.command_line()
    records = run_eval(cfg, progress=not args.no_progress, plots=not args.no_plots)
    out = Path(cfg.out).expanduser()
    runs = json.loads((out / META).read_text(encoding="utf-8"))["runs"]
    print(
        f"{len(records)} cells ({runs[-1]['cells_run']} computed, {len(records) - runs[-1]['cells_run']} "
        f"reused) in {out}/results.json; table in {out}/results.md",
        file=sys.stderr,
    )
    if args.print:
        print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def _add_eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="HF-layout checkpoint directory, or 'tiny'")
    p.add_argument("--methods", default="all", metavar="LIST", help="comma-separated methods (default: all)")
    p.add_argument(
        "--budgets",
        default="0.05,0.1,0.2",
        metavar="LIST",
        help="comma-separated ratios in (0, 1] or token counts (default: 0.05,0.1,0.2); dense runs once",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="method hyper-parameter, e.g. snapkv.window=16 (value parsed as JSON when possible); repeatable",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sample seed (default: 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--device", type=_device, default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default: cpu)"
    )


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate methods × budgets on long-context suites", description=cmd_eval.__doc__
    )
    _add_eval_common(p)
    p.add_argument(
        "--suite",
        default="all",
        metavar="LIST",
        help="comma-separated: passkey,needle,kv_retrieval,multihop,docqa,ppl (default: all)",
    )
    p.add_argument(
        "--lengths", default="1024,2048", metavar="LIST", help="prompt lengths in bytes (default: 1024,2048)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (reruns skip done cells)")
    p.add_argument("--n", type=int, default=20, metavar="N", help="samples per cell (default: 20)")
    p.add_argument(
        "--mode",
        choices=["query-agnostic", "question-in-prompt"],
        default="query-agnostic",
        help="compress the context before the question arrives (default) or prefill context+question",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_max_new_tokens,
        default=None,
        metavar="N|auto",
        help="answer tokens to generate (default: auto = longest answer + 2)",
    )
    p.add_argument("--batch-size", type=_non_negative_int, default=0, metavar="B", help="0 = all n at once")
    p.add_argument(
        "--ppl-tokens", type=int, default=128, metavar="T", help="scored tokens after each ppl context"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--print", action="store_true", help="print results.md at the end")
    p.set_defaults(handler=cmd_eval)


# --------------------------------------------------------------------------------------------- fidelity
def cmd_fidelity(args: argparse.Namespace) -> int:
    """Top-1 agreement and KL(dense || method) of next-token distributions on a dense greedy continuation.

    Works on any checkpoint: dense generates --steps tokens, then every method prefills the same prompt and
    is teacher-forced through that continuation.
    """
    import datetime as dt

    from mpckv.evals import common
    from mpckv.evals.config import parse_budgets, parse_method_params, parse_methods
    from mpckv.evals.fidelity import fidelity, fidelity_prompts
    from mpckv.evals.report import fidelity_table
    from mpckv.evals.suites import SUITES

    methods = parse_methods(args.methods)
    budgets = parse_budgets(args.budgets)
    params = parse_method_params(args.param, methods)
    if args.synthetic is not None and args.synthetic not in SUITES:
        raise UsageError(f"unknown suite {args.synthetic!r}; choose from {', '.join(SUITES)}")
    if args.steps < 1 or args.n < 1 or args.length < 64:
        raise UsageError("--steps and --n must be >= 1 and --length >= 64")
    text = _read_prompt(args) if args.prompt_file is not None else None
    mid = common.model_id(args.model)
    model, tok = common.load(args.model, args.dtype, args.device)
    prompts = fidelity_prompts(
        tok, model, text=text, synthetic=args.synthetic, length=args.length, n=args.n, seed=args.seed
    )
    records = fidelity(model, prompts, methods, budgets, steps=args.steps, params=params)
    payload = {
        "model": mid,
        "model_path": str(args.model),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "source": args.prompt_file if text is not None else f"synthetic:{args.synthetic}:{args.length}",
        "records": records,
    }
    if args.out is not None:
        try:
            common.write_json(Path(args.out).expanduser(), payload)
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc}") from exc
    if args.json:
        print(json.dumps(payload, indent=1))
    else:
        print(fidelity_table(records), end="")
    return 0


def _add_fidelity(sub: Any) -> None:
    p = sub.add_parser(
        "fidelity", help="compare methods with dense on any checkpoint", description=cmd_fidelity.__doc__
    )
    _add_eval_common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", metavar="FILE", help="UTF-8 prompt file ('-' for stdin)")
    src.add_argument("--synthetic", metavar="SUITE", help="generated prompts: passkey, needle, ..., ppl")
    p.add_argument(
        "--length", type=int, default=1024, metavar="N", help="synthetic prompt bytes (default: 1024)"
    )
    p.add_argument("--n", type=int, default=1, metavar="N", help="synthetic prompts (default: 1)")
    p.add_argument("--steps", type=int, default=32, metavar="S", help="compared positions (default: 32)")
    p.add_argument("--out", metavar="FILE", help="write the records as JSON")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(handler=cmd_fidelity, prompt=None)


# ----------------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    """Write the results page (tables per suite, plots copied to <out dir>/img/) from eval directories."""
    import shlex

    from mpckv.evals.report import write_report

    command = shlex.join(["mpckv", "report", "--results", *args.results, "--out", args.out])
    if args.fidelity:
        command += " " + shlex.join(["--fidelity", *args.fidelity])
    try:
        out = write_report(args.results, args.out, command=command, fidelity=args.fidelity)
    except OSError as exc:
        raise UsageError(f"cannot write the report {args.out}: {exc}") from exc
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="write docs/RESULTS.md from eval results", description=cmd_report.__doc__
    )
    p.add_argument("--results", nargs="+", required=True, metavar="DIR", help="eval output directories")
    p.add_argument("--out", default="docs/RESULTS.md", metavar="FILE", help="default: docs/RESULTS.md")
    p.add_argument(
        "--fidelity", nargs="*", default=[], metavar="FILE", help="JSON files of mpckv fidelity --out"
    )
    p.set_defaults(handler=cmd_report)


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
    _add_eval(sub)
    _add_fidelity(sub)
    _add_report(sub)
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
