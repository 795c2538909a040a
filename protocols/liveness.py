"""Party rendezvous check and heartbeat: mismatched, missing, dead and stalled parties in one line.

Before CrypTen (gloo) is initialised, :func:`handshake` runs our own small rendezvous on the
``tcp://HOST:PORT`` of ``mpckv party``: rank 0 listens there, every other party (and the dealer) connects
and sends its settings (world size, protocol, dealer, mpckv version). Rank 0 compares them with its own
and answers; a mismatch fails at once on both sides naming both values, a missing rank 0 fails after
exactly ``--rendezvous-timeout`` with one line (no C++ log), and a port already in use is reported as such.
When everybody has joined, rank 0 closes the listening socket (so that gloo's store can take the port)
and gloo is initialised as before.

The connections of the handshake stay open as a star (rank 0 ↔ every other process) and a
:class:`Monitor` thread sends a heartbeat byte every ``interval`` seconds over each of them. A process
that dies closes its connection: the other end sees it at once. A process that stops (SIGSTOP, a frozen
host) sends nothing: the other end notices after ``stall_s`` seconds. Either way the monitor prints one line
naming the lost rank — ``mpckv: error: lost rank 1: its process ended (connection closed)`` — and ends its
own process with status 1, even while the main thread is blocked inside a gloo collective. Rank 0 relays a
loss to the remaining parties so that in 3PC every survivor names the rank that was actually lost. A
party that finishes normally says goodbye first, and one that fails says why, so neither reads as lost.

This is a liveness check, not a progress check: a party that computes for a long time between collectives
still sends heartbeats (from its own thread), so no timeout has to scale with the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from mpckv.errors import MpckvError

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_STALL_S",
    "HandshakeError",
    "Monitor",
    "current",
    "handshake",
    "settings_of",
]

DEFAULT_STALL_S = 30.0  # a party silent this long counts as stalled (issue 16 asks for < 60 s)
DEFAULT_HEARTBEAT_S = 1.0


class HandshakeError(MpckvError, RuntimeError):
    """The parties could not agree to start (missing, mismatched, port in use)."""


_MONITOR: Monitor | None = None


def current() -> Monitor | None:
    """The monitor of this process, once :func:`handshake` succeeded."""
    return _MONITOR


def settings_of(world_size: int, protocol: str, ttp: bool) -> dict[str, Any]:
    """What every party must agree on (compared at the handshake)."""
    from mpckv import __version__

    return {"world_size": world_size, "protocol": protocol, "ttp": ttp, "version": __version__}


def _name(rank: int, world_size: int, ttp: bool) -> str:
    return "the dealer" if ttp and rank == world_size else f"rank {rank}"


def _describe(key: str, value: Any) -> str:
    if key == "world_size":
        return f"--world-size {value}"
    if key == "protocol":
        return f"--protocol {value}"
    if key == "ttp":
        return "a dealer (--ttp)" if value else "no dealer (no --ttp)"
    return f"mpckv {value}"


def _mismatch(mine: dict[str, Any], theirs: dict[str, Any], me: str, them: str) -> str | None:
    for key in ("world_size", "protocol", "ttp", "version"):
        if mine.get(key) != theirs.get(key):
            return (
                f"the parties were started with different settings: {me} has "
                f"{_describe(key, mine.get(key))}, {them} has {_describe(key, theirs.get(key))}; start every "
                "party with the same --world-size, --protocol and --ttp"
            )
    return None


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sock.sendall((json.dumps(msg) + "\n").encode())


class _Lines:
    """Newline-delimited JSON reader over a socket with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def read(self, deadline: float) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return dict(json.loads(line))


def _address(rendezvous: str) -> tuple[str, int]:
    parts = urlsplit(rendezvous)
    if parts.hostname is None or parts.port is None:
        raise HandshakeError(f"--rendezvous must be tcp://HOST:PORT, got {rendezvous!r}")
    return parts.hostname, parts.port


def handshake(
    rank: int,
    world_size: int,
    protocol: str,
    ttp: bool,
    rendezvous: str,
    timeout: float,
    stall_s: float = DEFAULT_STALL_S,
    interval: float = DEFAULT_HEARTBEAT_S,
) -> Monitor:
    """Meet the other processes at ``rendezvous`` (tcp only), compare settings, start the heartbeat.

    Raises
    ------
    HandshakeError
        Missing peers after ``timeout`` s, mismatched settings (naming both values), a port in use.
    """
    global _MONITOR
    host, port = _address(rendezvous)
    mine = settings_of(world_size, protocol, ttp)
    total = world_size + (1 if ttp else 0)
    me = _name(rank, world_size, ttp)
    deadline = time.monotonic() + timeout
    if rank == 0:
        links = _serve(host, port, total, mine, deadline, timeout, rendezvous)
    else:
        links = {0: _join(rank, host, port, mine, me, deadline, timeout, rendezvous)}
    _MONITOR = Monitor(rank, links, lambda r: _name(r, world_size, ttp), stall_s, interval)
    _MONITOR.start()
    return _MONITOR


def _serve(
    host: str, port: int, total: int, mine: dict[str, Any], deadline: float, timeout: float, url: str
) -> dict[int, socket.socket]:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as exc:
        listener.close()
        raise HandshakeError(
            f"rank 0 cannot listen on port {port} ({exc.strerror or exc}); another program (or an "
            "earlier run) holds it: choose another --rendezvous port (or leave --port out)"
        ) from None
    listener.listen(total)
    links: dict[int, socket.socket] = {}
    try:
        while len(links) < total - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(1, total) if r not in links]
                raise HandshakeError(
                    f"rank 0: rank(s) {missing} did not join at {url} within {timeout:g} s; start every "
                    f"party with the same --rendezvous, or raise --rendezvous-timeout"
                )
            listener.settimeout(min(left, 1.0))
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                hello = _Lines(conn).read(min(deadline, time.monotonic() + 10.0))
            except (ConnectionError, ValueError):
                hello = None
            if not hello or hello.get("t") != "hello" or not isinstance(hello.get("rank"), int):
                conn.close()  # not one of ours (a port scan, a stray connection): ignore it
                continue
            r = int(hello["rank"])
            them = f"rank {r}" if r < mine["world_size"] else "the dealer"
            why = _mismatch(mine, dict(hello.get("settings", {})), "rank 0", them)
            if why is None and not 0 < r < total:
                why = f"rank 0 expects ranks 1..{total - 1}, but rank {r} joined"
            if why is None and r in links:
                why = f"rank {r} joined twice; give every party its own --rank"
            if why is not None:
                for sock in [conn, *links.values()]:
                    _send(sock, {"t": "reject", "msg": why})
                    sock.close()
                raise HandshakeError(why)
            links[r] = conn
            _send(conn, {"t": "welcome", "settings": mine})
        for conn in links.values():
            _send(conn, {"t": "start"})
    except BaseException:
        for conn in links.values():
            conn.close()
        raise
    finally:
        listener.close()  # gloo's store takes the port next
    return links


def _join(
    rank: int,
    host: str,
    port: int,
    mine: dict[str, Any],
    me: str,
    deadline: float,
    timeout: float,
    url: str,
) -> socket.socket:
    sock: socket.socket | None = None
    while sock is None:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError:
            if time.monotonic() >= deadline:
                raise HandshakeError(
                    f"{me} could not join the other parties at {url} within {timeout:g} s (rank 0 is not "
                    f"listening there). Check that rank 0 runs with the same --rendezvous and that its "
                    f"host:port is reachable from here (firewall), or raise --rendezvous-timeout."
                ) from None
            time.sleep(0.2)
    reader = _Lines(sock)
    _send(sock, {"t": "hello", "rank": rank, "settings": mine})
    try:
        while True:
            msg = reader.read(deadline)
            if msg is None:
                raise HandshakeError(
                    f"{me} reached rank 0 at {url}, but not every party joined within {timeout:g} s; "
                    "start all of them with the same --rendezvous, or raise --rendezvous-timeout"
                )
            if msg.get("t") == "reject":
                raise HandshakeError(str(msg.get("msg")))
            if msg.get("t") == "welcome":
                why = _mismatch(mine, dict(msg.get("settings", {})), me, "rank 0")
                if why is not None:
                    raise HandshakeError(why)
            if msg.get("t") == "start":
                break
    except ConnectionError:
        sock.close()
        raise HandshakeError(f"{me}: rank 0 at {url} closed the rendezvous before the run started") from None
    except BaseException:
        sock.close()
        raise
    _wait_for_store(host, port, deadline)
    return sock


def _wait_for_store(host: str, port: int, deadline: float) -> None:
    """Give rank 0 a moment to open gloo's store on the port we just left (avoids its retry warnings)."""
    end = min(deadline, time.monotonic() + 2.0)
    while time.monotonic() < end:
        time.sleep(0.05)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((host, port)) == 0:
                return


class Monitor(threading.Thread):
    """Heartbeats over the handshake's connections; reports and exits on the first lost peer."""

    def __init__(
        self,
        rank: int,
        links: dict[int, socket.socket],
        name: Callable[[int], str],
        stall_s: float,
        interval: float,
    ) -> None:
        super().__init__(name="mpckv-heartbeat", daemon=True)
        self.rank, self.links, self.name_of = rank, dict(links), name
        self.stall_s, self.interval = stall_s, interval
        self.lost: str | None = None
        self.lost_event = threading.Event()
        self._stop = threading.Event()
        self._done: set[int] = set()
        self._armed: set[int] = set()  # peers whose silence counts (they finished start-up)
        self._lock = threading.Lock()
        self.exit: Callable[[str], None] = exit_with
        self._sel = selectors.DefaultSelector()
        for r, sock in self.links.items():
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, r)

    # ---------------------------------------------------------------- main-thread API
    def arm(self) -> None:
        """Start-up is over (gloo joined): from now on our silence counts as a stall for the others.

        Before that only a closed connection counts, since imports and gloo's own rendezvous may hold
        the interpreter lock for seconds on a loaded machine.
        """
        self._broadcast({"t": "armed"})

    def close(self) -> None:
        """A normal end: tell the others, stop the heartbeat."""
        self._broadcast({"t": "bye"})
        self._stop.set()

    def announce_failure(self, message: str) -> None:
        """This process fails on its own: tell the others why (they report it instead of a lost rank)."""
        self._broadcast({"t": "fail", "rank": self.rank, "msg": message[:300]})
        self._stop.set()

    def wait_lost(self, seconds: float) -> str | None:
        self.lost_event.wait(seconds)
        return self.lost

    # ---------------------------------------------------------------- thread
    def _broadcast(self, msg: dict[str, Any]) -> None:
        with self._lock:
            for r, sock in self.links.items():
                if r not in self._done:
                    _send(sock, msg)

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # the monitor must never take a healthy party down by itself
            self._stop.set()
        finally:
            self._sel.close()

    def _loop(self) -> None:
        sel = self._sel
        now = time.monotonic()
        buffers: dict[int, bytes] = dict.fromkeys(self.links, b"")
        seen: dict[int, float] = dict.fromkeys(self.links, now)
        next_beat = now
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                with self._lock:
                    for r, sock in self.links.items():
                        if r not in self._done:
                            with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                                sock.send(b"\n")
                next_beat = now + self.interval
            for key, _ in sel.select(timeout=min(self.interval, 0.5)):
                r = int(key.data)
                try:
                    chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    if r not in self._done and not self._stop.is_set():
                        self._lose(f"lost {self.name_of(r)}: its process ended (connection closed)")
                    continue
                seen[r] = time.monotonic()
                buffers[r] += chunk
                while b"\n" in buffers[r]:
                    line, _, buffers[r] = buffers[r].partition(b"\n")
                    if line.strip():
                        self._message(r, line)
            now = time.monotonic()
            for r, t in seen.items():
                if r not in self._armed or r in self._done or self._stop.is_set():
                    continue
                if now - t > self.stall_s:
                    self._lose(
                        f"lost {self.name_of(r)}: it stopped responding (no heartbeat for {self.stall_s:g} s)"
                    )
                    seen[r] = float("inf")

    def _message(self, r: int, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        kind = msg.get("t")
        if kind == "armed":
            self._armed.add(r)
        elif kind == "bye":
            self._done.add(r)
        elif kind == "fail":
            self._done.add(r)
            self._lose(f"{self.name_of(r)} failed: {msg.get('msg', '')}")
        elif kind == "lost":
            self._done.add(r)
            self._lose(f"{msg.get('msg', '')} (reported by {self.name_of(r)})")

    def _lose(self, message: str) -> None:
        if self.lost is not None:
            return
        self.lost = message
        self.lost_event.set()
        if self.rank == 0:  # tell the other survivors which rank was lost
            self._broadcast({"t": "lost", "msg": message})
        self._stop.set()
        self.exit(message)


_EXIT_LOCK = threading.Lock()  # taken once, never released: the first reporter ends the process

#: Under ``mpckv launch`` a survivor waits this long before reporting, so that the launcher sees the
#: culprit's exit first (and names it); it usually stops the survivor during the wait.
LAUNCHED_LINGER_S = 2.0


def exit_with(message: str, code: int = 1) -> None:
    """Print ``mpckv: error: MESSAGE`` and leave at once (the main thread may be stuck inside gloo).

    Safe to call from any thread; only the first caller prints.
    """
    _EXIT_LOCK.acquire()
    if os.environ.get("MPCKV_LAUNCHED"):
        time.sleep(LAUNCHED_LINGER_S)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"mpckv: error: {' '.join(message.split())}\n")
        sys.stderr.flush()
    os._exit(code)
