"""Killed and stalled parties, at prefill and at decode, under ``mpckv launch`` and in a manual pair.

Each scenario runs a real private generation (``generate --secure`` on a one-layer random model) with
``tests/faults/parties.py:generate_with_marks``, waits until the chosen rank prints ``MARK <phase> <pid>``
and sends it SIGKILL or SIGSTOP. Contract (issue 16, cases 12-13):

* ``launch``: the launcher exits with 128 + 9 for a killed rank (naming it) and with 1 for a stalled one
  (the survivor's heartbeat names the stalled rank within ``--heartbeat-timeout``); no traceback.
* manual ``party`` pair: the survivor exits 1 with one line ``lost rank R: ...`` and no gloo traceback.
* no ``--out`` file is left behind, and every process is gone at the end.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from faults.helpers import NOISE, PARTIES, ROOT, assert_one_line_error, env, free_port

pytestmark = [pytest.mark.faults, pytest.mark.mpc, pytest.mark.slow]

HEARTBEAT_S = 10.0  # generous: the CI machine may be loaded (the default is 30 s)
WAIT_S = 90.0  # a scenario must end within this after the signal


class Proc:
    """A child whose stdout is scanned for ``MARK`` lines while stderr is collected."""

    def __init__(self, cmd: list[str]) -> None:
        self.p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=ROOT, text=True
        )
        self.marks: queue.Queue[tuple[str, int]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        assert self.p.stdout is not None and self.p.stderr is not None
        threading.Thread(target=self._read, args=(self.p.stdout, self.out, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, self.err, False), daemon=True).start()

    def _read(self, pipe: IO[str], sink: list[str], marks: bool) -> None:
        for line in pipe:
            sink.append(line)
            if marks and "MARK " in line:
                prefix, _, rest = line.partition("MARK ")
                phase, pid = rest.split()
                self.marks.put((prefix.strip() + " " + phase, int(pid)))

    def wait_mark(self, wanted: str, timeout: float = 120.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                tag, pid = self.marks.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            if tag.endswith(wanted):
                return pid
        raise AssertionError(f"no {wanted!r} mark; stderr: {''.join(self.err)[-2000:]}")

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError(f"hung; stderr: {''.join(self.err)[-2000:]}") from None
        time.sleep(0.2)  # let the reader threads drain
        return code, "".join(self.err)


def _secure_argv(ckpt: Path, out: Path) -> list[str]:
    return [
        "generate",
        "--secure",
        "--model",
        str(ckpt),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
    ]


def _kill_quietly(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


SCENARIOS = [
    (rank, phase, sig) for sig in ("SIGKILL", "SIGSTOP") for phase in ("prefill", "decode") for rank in (0, 1)
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("rank", "phase", "sig"), SCENARIOS)
def test_launch_survives_a_lost_rank(small_ckpt, tmp_path, rank, phase, sig):
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "mpckv",
        "launch",
        "--parties",
        "2",
        "--heartbeat-timeout",
        str(HEARTBEAT_S),
        "--pycall",
        f"{PARTIES}:generate_with_marks",
        "--",
        *_secure_argv(small_ckpt, out),
    ]
    proc = Proc(cmd)
    pid = proc.wait_mark(f"[rank {rank}] {phase}")
    start = time.monotonic()
    os.kill(pid, getattr(signal, sig))
    try:
        code, err = proc.finish(WAIT_S)
    finally:
        _kill_quietly(pid)
    assert time.monotonic() - start < WAIT_S
    if sig == "SIGKILL":
        last = assert_one_line_error(
            code, err, 128 + signal.SIGKILL, f"rank {rank} was killed by signal SIGKILL"
        )
    else:
        last = assert_one_line_error(code, err, 1, f"rank {1 - rank} failed with exit code 1")
        assert f"lost rank {rank}: it stopped responding" in err
    assert "stopped" in last
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("rank", "phase", "sig"), SCENARIOS)
def test_manual_party_pair_survivor_names_the_lost_rank(small_ckpt, tmp_path, rank, phase, sig):
    out = tmp_path / "r.json"
    url = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        Proc(
            [
                sys.executable,
                "-m",
                "mpckv",
                "party",
                "--rank",
                str(r),
                "--world-size",
                "2",
                "--rendezvous",
                url,
                "--heartbeat-timeout",
                str(HEARTBEAT_S),
                "--pycall",
                f"{PARTIES}:generate_with_marks",
                "--",
                *_secure_argv(small_ckpt, out),
            ]
        )
        for r in (0, 1)
    ]
    try:
        pid = procs[rank].wait_mark(phase)
        start = time.monotonic()
        os.kill(pid, getattr(signal, sig))
        code, err = procs[1 - rank].finish(WAIT_S)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            _kill_quietly(p.p.pid)
            p.p.wait(timeout=30)
    why = "its process ended" if sig == "SIGKILL" else "it stopped responding"
    assert_one_line_error(code, err, 1, f"lost rank {rank}: {why}")
    assert elapsed < (10.0 if sig == "SIGKILL" else HEARTBEAT_S + 10.0)
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))
    assert all(n not in err for n in NOISE)
