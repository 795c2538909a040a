"""``mpckv convert SRC --out DIR``: a GGUF file (or an installable model's name) → an HF directory.

The directory holds ``config.json``, ``model.safetensors`` (fp32, q/k rows in HF order),
``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template); transformers'
``AutoModelForCausalLM`` / ``AutoTokenizer`` and :func:`mpckv.load_model` read it. See
:mod:`mpckv.gguf_cache`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a GGUF checkpoint into an HF-layout directory."""
    from mpckv.errors import CheckpointError
    from mpckv.gguf_cache import convert_gguf
    from mpckv.gguf_loader import find_gguf
    from mpckv.models import is_model_name, model_path

    src = model_path(args.src) if is_model_name(args.src) else find_gguf(args.src)
    if src is None:
        raise CheckpointError(f"{args.src} is not a .gguf file, a directory holding one, or a model name")
    out = Path(args.out).expanduser()
    if (out / "config.json").exists() and not args.force:
        raise CheckpointError(f"{out} already holds a checkpoint; pass --force to overwrite it")
    convert_gguf(src, out)
    print(f"wrote {out} (from {src})")
    return 0


def add_convert_command(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="convert a GGUF checkpoint to an HF directory", description=cmd_convert.__doc__
    )
    p.add_argument(
        "src", metavar="SRC", help="a .gguf file, a directory holding one, or a model name (smollm2, …)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in DIR")
    p.set_defaults(handler=cmd_convert)
