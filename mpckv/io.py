"""The one output writer: check an output path before a run, write it atomically after.

Every command that writes a result file (``generate --out``, ``generate --secure --out``,
``bench secure --json``, the eval result files) goes through :func:`check_writable` before any work and
:func:`write_text_atomic` / :func:`write_json_atomic` at the end, so that

* a directory, a missing parent that cannot be created, or a read-only place fails *before* the run with
  one line, instead of losing a finished result;
* the file is never half-written: the text goes to a temporary file in the same directory, is flushed to
  disk and renamed over the target (``os.replace`` is atomic on POSIX and Windows within one file system);
  an error while writing (e.g. a full disk) removes the temporary file and leaves any previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mpckv.errors import MpckvError

__all__ = ["OutputError", "check_writable", "write_json_atomic", "write_text_atomic"]


class OutputError(MpckvError, OSError):
    """An output file cannot be written (bad path, permissions, full disk)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Raise :class:`OutputError` unless ``path`` can be written as a file; return it expanded.

    Creates missing parent directories (like the writers do), and probes the directory with a temporary
    file, so that permissions and read-only file systems are caught too. Nothing is left behind.
    """
    out = Path(path).expanduser()
    if str(path) == "" or out.name in ("", ".", ".."):
        raise OutputError(f"{what} {str(path)!r} is not a file name")
    if out.is_dir():
        raise OutputError(f"{what} {out} is a directory; give a file name, e.g. {out / 'result.json'}")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the directory of {what} {out}: {_reason(exc)}") from None
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {out}: {parent} is not a directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"cannot write {what} {out}: permission denied")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {out}: {_reason(exc)}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return out


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str = "output file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename in the same directory."""
    out = check_writable(path, what)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {what} {out}: {_reason(exc)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return out


def write_json_atomic(
    path: str | os.PathLike[str], payload: Any, what: str = "output file", **dump_kwargs: Any
) -> Path:
    """:func:`write_text_atomic` of ``json.dumps(payload, indent=2) + "\\n"``."""
    kwargs = {"indent": 2, "ensure_ascii": False, **dump_kwargs}
    return write_text_atomic(path, json.dumps(payload, **kwargs) + "\n", what)
