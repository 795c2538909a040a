"""An interrupted ``mpckv eval`` (SIGINT, then SIGKILL mid-run) resumes to the results of an uninterrupted
run, and never leaves a half-written results file (issue 16)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults.helpers import ROOT, env

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ARGS = [
    "eval", "--model", "tiny", "--suite", "passkey", "--lengths", "256,320,384,448",
    "--methods", "dense,streamingllm,snapkv", "--budgets", "0.5,0.25", "--n", "2",
    "--no-plots", "--no-progress",
]  # fmt: skip
VOLATILE = ("seconds",)  # wall time differs between runs
# Cells of one (suite, length) share a prefill and are written together: four lengths give four
# checkpoints to interrupt between.


def _records(out: Path) -> list[dict]:
    text = (out / "results.json").read_text(encoding="utf-8")
    return list(json.loads(text))  # never half-written: always valid JSON


def _stable(records: list[dict]) -> list[dict]:
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def _interrupt(out: Path, sig: signal.Signals, after: int) -> int:
    """Start an eval into ``out`` and send ``sig`` once ``after`` records are on disk; return its status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpckv", *ARGS, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "results.json").exists() and len(_records(out)) >= after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert err.decode().strip().splitlines()[-1] == "mpckv: interrupted"
        assert b"Traceback" not in err
    return proc.returncode


@pytest.mark.timeout(400)
def test_interrupted_eval_resumes_to_identical_results(tmp_path):
    ref = tmp_path / "ref"
    done = subprocess.run(
        [sys.executable, "-m", "mpckv", *ARGS, "--out", str(ref)], env=env(), cwd=ROOT, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    out = tmp_path / "cut"
    assert _interrupt(out, signal.SIGINT, after=1) == 130
    first = len(_records(out))
    assert _interrupt(out, signal.SIGKILL, after=first + 1) == -signal.SIGKILL
    assert len(_records(out)) > first  # the SIGKILLed run kept what it had finished
    resumed = subprocess.run(
        [sys.executable, "-m", "mpckv", *ARGS, "--out", str(out)], env=env(), cwd=ROOT, capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert _stable(_records(out)) == _stable(_records(ref))
    assert not list(out.glob(".*.tmp"))
