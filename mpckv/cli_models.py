"""``mpckv models``: the installable real models, whether they are installed, where, and their size.

``mpckv models --prepare NAME`` assembles (and verifies) a multi-part model into the cache now rather
than on first load. See :mod:`mpckv.models`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_models(args: argparse.Namespace) -> int:
    """List installable models (name, installed?, path, size) or prepare one."""
    from mpckv.cli_common import _fmt_bytes
    from mpckv.models import MODELS, model_path, model_status

    for name in args.prepare or []:
        print(f"{name}: {model_path(name)}")
    if args.prepare:
        return 0
    rows = [model_status(n) for n in MODELS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("name", "installed", "size", "path", "model")]
    for r in rows:
        size = _fmt_bytes(int(r["size"])) if isinstance(r["size"], int) else "-"
        installed = "yes" if r["installed"] else f"no ({MODELS[str(r['name'])].install})"
        table.append((str(r["name"]), installed, size, str(r["path"] or "-"), str(r["summary"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def add_models_command(sub: Any) -> None:
    p = sub.add_parser("models", help="list the installable real models", description=cmd_models.__doc__)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument(
        "--prepare", action="append", metavar="NAME", help="assemble and verify this model now; repeatable"
    )
    p.set_defaults(handler=cmd_models)
