"""``mpckv eval``, ``mpckv fidelity`` and ``mpckv report`` (registered by :mod:`mpckv.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mpckv.cli_common import UsageError, _device, _non_negative_int, _read_prompt


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
    """Evaluate methods × budgets on long-context suites and held-out perplexity.

    Real models (a subword tokenizer) get RULER-style tasks on natural prose, rendered with the chat
    template and sized in prompt tokens; the byte-level tiny model gets its byte-sized synthetic tasks.
    Each sample is prefilled densely once and every method and budget replays its prefill hooks on it.
    Writes OUT/results.json, OUT/results.md, OUT/predictions.jsonl, OUT/meta.json and OUT/plot_<suite>.png;
    cells already in OUT/results.json (same suite, length, method, budget, mode, n, seed, model and
    parameters) are skipped, and the finished sample batches of an interrupted run (OUT/partial.jsonl)
    are reused.
    """
    from mpckv.evals.config import EvalConfig, parse_method_params, parse_methods
    from mpckv.evals.runner import META, run_eval

    methods = parse_methods(args.methods)
    out_dir = args.out if args.out is not None else str(Path("eval-runs") / Path(str(args.model)).name)
    cfg = EvalConfig(
        model=args.model,
        out=out_dir,
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
        prefill_cache=args.prefill_cache,
    )
    cfg.command = cfg.command_line()
    from mpckv.cli_common import check_eval_lengths

    check_eval_lengths(str(cfg.model), cfg.lengths)  # before any model work (issue 16, cases 8-9)
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
        help="comma-separated budgets, the rule of `generate --budget`: ratios with a point or %% "
        "(0.1, 10%%, 1.0 = all), token counts without (256) (default: 0.05,0.1,0.2); dense runs once",
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
        "--lengths",
        default="1024,2048",
        metavar="LIST",
        help="prompt lengths in tokens of the model's tokenizer, chat template included (bytes for the "
        "byte-level tiny model) (default: 1024,2048)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory; reruns skip done cells (default: eval-runs/<model name>)",
    )
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
    p.add_argument(
        "--batch-size",
        type=_non_negative_int,
        default=None,
        metavar="B",
        help="samples per prefill; 0 = all n at once (default: all n for byte-level models, 4 otherwise)",
    )
    p.add_argument(
        "--ppl-tokens", type=int, default=128, metavar="T", help="scored tokens after each ppl context"
    )
    p.add_argument(
        "--prefill-cache",
        default=None,
        metavar="DIR",
        help="keep each batch's recorded dense prefill in DIR and reuse it in later runs over the same "
        "prompts, model, dtype and code (large: ~2.3 GB per 10 samples of 4K tokens on a 0.5B model)",
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
        "--length",
        type=int,
        default=1024,
        metavar="N",
        help="synthetic prompt tokens (bytes for the byte-level tiny model) (default: 1024)",
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
    if args.bench:
        command += " " + shlex.join(["--bench", *args.bench])
    if args.notes:
        if not Path(args.notes).is_file():
            raise UsageError(f"--notes {args.notes}: no such file")
        command += " " + shlex.join(["--notes", args.notes])
    try:
        out = write_report(
            args.results,
            args.out,
            command=command,
            fidelity=args.fidelity,
            bench=args.bench,
            notes=args.notes,
        )
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
    p.add_argument(
        "--bench", nargs="*", default=[], metavar="FILE", help="JSON of mpckv bench secure/plaintext"
    )
    p.add_argument(
        "--notes", default=None, metavar="FILE", help="markdown placed under the title (e.g. bench commands)"
    )
    p.set_defaults(handler=cmd_report)
