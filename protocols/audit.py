"""Reveal audit: record every application-level opening of a secret value.

CrypTen's protocols open *masked* values internally (Beaver triples, comparisons); those reveal nothing
and go through the share-level primitives. What a program reveals on purpose goes through
``MPCTensor.get_plain_text`` / ``MPCTensor.reveal``: this module wraps both and records, per call, the
shape, the destination party (``None`` = every party) and the accounting labels in force. Tests assert
that a secure generation reveals exactly one ``[1, V]`` one-hot per generated token, to the output party
only (``tests/protocols/test_secure_generate.py``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten


@dataclass(frozen=True)
class RevealEvent:
    """One application-level reveal."""

    shape: tuple[int, ...]
    dst: int | None
    labels: str


_LOG: list[RevealEvent] | None = None
_INSTALLED = False


def _labels() -> str:
    state = comm._STATE  # the label stacks of this party's accounting
    return "/".join(stack[-1] if stack else "-" for stack in (state.phases, state.ops))


def _wrap(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _LOG is not None:
            dst = kwargs.get("dst", args[0] if args else None)
            _LOG.append(RevealEvent(tuple(self.shape), dst, _labels()))
        return fn(self, *args, **kwargs)

    wrapper._mpckv_audit = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap ``MPCTensor.get_plain_text`` and ``MPCTensor.reveal`` (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    crypten = import_crypten()
    cls = crypten.mpc.MPCTensor
    # get_plain_text calls reveal internally in some versions; wrap both but record once per outer call.
    for name in ("get_plain_text", "reveal"):
        fn = getattr(cls, name)
        if not getattr(fn, "_mpckv_audit", False):
            setattr(cls, name, _wrap(fn))
    _INSTALLED = True


@contextlib.contextmanager
def recording() -> Iterator[list[RevealEvent]]:
    """Record every reveal made inside the block (on this party)."""
    global _LOG
    install()
    previous, _LOG = _LOG, []
    log = _LOG
    try:
        yield log
    finally:
        _LOG = previous
