"""Helpers shared by the ``mpckv`` subcommands (argument types, parameter parsing, prompt reading)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mpckv.errors import MpckvError


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
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(data, str):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"cannot read the prompt from stdin: {exc}") from None
    path = Path(args.prompt_file).expanduser()
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc}") from None


def check_budget_applies(method: str, budget: Any) -> None:
    """Refuse ``--budget`` for a method (or composition) whose every part ignores it (``dense``)."""
    if budget is None:
        return
    from mpckv.registry import method_class

    parts = [p.strip() for p in method.split("+")]
    if all(getattr(method_class(p), "family", "") == "baseline" for p in parts):
        raise UsageError(
            f"--budget has no effect with --method {method} (it keeps every KV entry); "
            "drop --budget or choose a compressing method (see `mpckv methods`)"
        )


def model_positions(model: str) -> tuple[int, bool] | None:
    """``(max_position_embeddings, byte_tokenizer)`` read from a checkpoint's config.json, cheaply.

    ``None`` when the model is not a local directory with a config.json (a named model, a GGUF file):
    the engine still refuses over-long runs, only later.
    """
    from pathlib import Path

    from mpckv.config import ModelConfig

    try:
        from mpckv.checkpoint import _resolve_dir

        root = _resolve_dir(model)
    except MpckvError:
        return None
    if not (Path(root) / "config.json").is_file():
        return None
    config = ModelConfig.from_file(Path(root) / "config.json")
    return config.max_position_embeddings, not (Path(root) / "tokenizer.json").exists()


#: A token is at most this many bytes of text for any tokenizer we load (a loose bound, for refusing
#: absurd ``--lengths`` up front; the engine checks the exact token count).
MAX_BYTES_PER_TOKEN = 16


def check_eval_lengths(model: str, lengths: Sequence[int]) -> None:
    """Refuse eval prompt lengths (bytes) that cannot fit the model's positions, before any model work."""
    info = model_positions(model)
    if info is None:
        return
    positions, byte_level = info
    limit = positions if byte_level else positions * MAX_BYTES_PER_TOKEN
    bad = [n for n in lengths if n > limit]
    if bad:
        why = "one token per byte" if byte_level else f"at most {MAX_BYTES_PER_TOKEN} bytes per token"
        raise UsageError(
            f"--lengths {','.join(map(str, bad))} exceed what model {model} can hold: "
            f"{positions} positions ({why}, so at most {limit} bytes)"
        )


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
