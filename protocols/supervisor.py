"""Supervise local child processes: prefixed output, and one failure stops them all.

What :func:`mpckv.protocols.launcher.launch` runs its party processes with. Each child runs in its own
process group (and, on Linux, dies with its parent); :func:`pump` copies its stdout/stderr line by line
with a ``[rank R] `` prefix; :func:`supervise` waits for the parties, and when one exits non-zero or is
killed, or the deadline passes, :func:`stop_all` sends SIGTERM, then SIGKILL after a grace period, to every
other child, and a one-line ``mpckv: error: ...`` names the culprit.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from typing import IO, Any

__all__ = [
    "Child",
    "child_death_signal",
    "describe",
    "drain",
    "exit_status",
    "free_port",
    "pump",
    "raise_interrupt",
    "report",
    "stop_all",
    "supervise",
    "notify_on_exit",
]


class Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.threads: list[threading.Thread] = []


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pump(pipe: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    """Copy ``pipe`` to ``out`` line by line with ``prefix``; keep draining if ``out`` breaks."""
    writable = True
    with contextlib.suppress(OSError, ValueError):
        for raw in iter(pipe.readline, b""):
            if not writable:
                continue  # e.g. `mpckv launch ... | head`: the child must not block on a full pipe
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            try:
                with lock:
                    out.write(f"{prefix}{line}\n")
                    out.flush()
            except (OSError, ValueError):
                writable = False
    with contextlib.suppress(OSError):
        pipe.close()


def notify_on_exit(child: Child, events: queue.Queue[Child]) -> None:
    child.proc.wait()
    events.put(child)


def child_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL if the launcher dies, so no party outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def exit_status(code: int) -> int:
    """The shell's status for a child's return code: itself, or 128 + N when killed by signal N."""
    return code if code > 0 else 128 - code


def describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {signal.Signals(-code).name} (exit {code})"
        return f"was killed by signal {-code}"
    return f"failed with exit code {code}"


def stop_all(children: list[Child], grace_s: float) -> list[str]:
    """SIGTERM the running children's process groups, SIGKILL what is left after ``grace_s``."""
    running = [c for c in children if c.proc.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for c in running:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        for c in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    return [c.name for c in running]


def drain(children: list[Child], seconds: float = 2.0) -> None:
    """Let the output of exited children reach the streams, so that our error line comes last."""
    deadline = time.monotonic() + seconds
    for c in children:
        if c.proc.poll() is not None:
            for t in c.threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def report(err: IO[str], lock: threading.Lock, message: str) -> None:
    with lock:
        err.write(f"mpckv: error: {message}\n")
        err.flush()


def supervise(
    children: list[Child],
    events: queue.Queue[Child],
    world_size: int,
    timeout: float,
    grace_s: float,
    err: IO[str],
    lock: threading.Lock,
) -> int:
    deadline = time.monotonic() + timeout
    parties_left = {c.name for c in children[:world_size]}
    while parties_left:
        remaining = deadline - time.monotonic()
        try:
            child = events.get(timeout=max(0.0, min(0.5, remaining)))
        except queue.Empty:
            if remaining <= 0:
                stopped = stop_all(children, grace_s)
                drain(children)
                report(err, lock, f"timed out after {timeout:g} s; stopped {', '.join(stopped)}")
                return 124
            continue
        code = int(child.proc.returncode)
        if code != 0:
            stopped = stop_all(children, grace_s)
            drain(children)
            others = f"; stopped {', '.join(stopped)}" if stopped else ""
            report(err, lock, f"{child.name} {describe(code)}{others}")
            return exit_status(code)
        parties_left.discard(child.name)
    # Every party is done; the dealer leaves on rank 0's "terminate" (crypten.uninit()).
    for c in children[world_size:]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=grace_s)
        if c.proc.returncode not in (None, 0):
            code = int(c.proc.returncode)
            drain(children)
            report(err, lock, f"{c.name} {describe(code)}")
            return exit_status(code)
    return 0
