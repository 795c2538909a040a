"""Functions that run inside launched parties (``--pycall tests/faults/parties.py:NAME``).

``generate_with_marks`` runs ``mpckv generate --secure ...`` and prints ``MARK <phase> <pid>`` (flushed)
when this party enters the secure prefill and the second decode step, so that a test can signal exactly
one rank at exactly that phase.
"""

from __future__ import annotations

import os
from typing import Any


def generate_with_marks(argv: list[str]) -> int:
    from mpckv.cli import main
    from mpckv.plaintext.engine import Engine

    prefill, decode = Engine.prefill, Engine.decode

    def marked_prefill(self: Engine, input_ids: Any) -> Any:
        print(f"MARK prefill {os.getpid()}", flush=True)
        return prefill(self, input_ids)

    def marked_decode(self: Engine, session: Any, tokens: Any) -> Any:
        if session.step == 1:
            print(f"MARK decode {os.getpid()}", flush=True)
        return decode(self, session, tokens)

    Engine.prefill = marked_prefill  # type: ignore[method-assign]
    Engine.decode = marked_decode  # type: ignore[method-assign]
    return main(argv)
