"""Helpers of the fault-injection suite (issue 16).

Every fault test asserts the same contract: exit status 2 (usage) or 1 (runtime; the launcher's
128 + N when it reports a party killed by signal N), the last line of stderr is ``mpckv: error: ...``,
there is no Python traceback or C++ log dump, the run ends within the test's timeout, and no output file is
half-written.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTIES = Path(__file__).resolve().with_name("parties.py")

# Substrings that must never reach the user: Python tracebacks and c10d / gloo log lines.
NOISE = (
    "Traceback (most recent call last)",
    "[W socket",
    "[E socket",
    "frame #",
    "c10::",
    "terminate called",
)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def mpckv(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mpckv ARGS`` in a fresh process (stdin as bytes)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mpckv", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=env(),
        cwd=ROOT,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def assert_one_line_error(code: int, err: str, expected_code: int, *needles: str) -> str:
    """The failure contract: status, one ``mpckv: error:`` line last, no traceback or C++ noise."""
    assert code == expected_code, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("mpckv: error: "), err[-3000:]
    for noise in NOISE:
        assert noise not in err, err[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
