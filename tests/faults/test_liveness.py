"""The party handshake and heartbeat (protocols/liveness.py; issue 16, cases 12-14), without CrypTen.

In-process tests drive :class:`Monitor` over socket pairs and the handshake over loopback threads; two
small process tests check the CLI end to end (a rank started alone; parties with different settings).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import pytest

from faults.helpers import assert_one_line_error, free_port, mpckv
from mpckv.protocols import liveness
from mpckv.protocols.liveness import HandshakeError, Monitor

pytestmark = pytest.mark.faults


class Recorder:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.event = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.event.set()


def _monitor(rank: int, links: dict[int, socket.socket], stall_s: float = 30.0) -> tuple[Monitor, Recorder]:
    names = {0: "rank 0", 1: "rank 1", 2: "rank 2"}
    mon = Monitor(rank, links, names.__getitem__, stall_s=stall_s, interval=0.1)
    rec = Recorder()
    mon.exit = rec
    mon.start()
    return mon, rec


def test_a_dead_peer_is_named_at_once():
    mine, theirs = socket.socketpair()
    mon, rec = _monitor(0, {1: mine})
    start = time.monotonic()
    theirs.close()  # what the kernel does when the peer process dies
    assert rec.event.wait(5.0)
    assert time.monotonic() - start < 2.0
    assert rec.messages == ["lost rank 1: its process ended (connection closed)"]


def test_a_stalled_peer_is_named_after_the_stall_timeout():
    mine, theirs = socket.socketpair()
    mon, rec = _monitor(1, {0: mine}, stall_s=0.6)
    theirs.sendall(b'{"t": "armed"}\n')  # start-up done, then silence, like a SIGSTOPped process
    start = time.monotonic()
    assert rec.event.wait(5.0)
    assert 0.5 < time.monotonic() - start < 3.0
    assert rec.messages == ["lost rank 0: it stopped responding (no heartbeat for 0.6 s)"]
    theirs.close()


def test_silence_during_start_up_is_not_a_stall():
    mine, theirs = socket.socketpair()
    mon, rec = _monitor(1, {0: mine}, stall_s=0.3)
    time.sleep(1.5)  # never armed: imports and gloo's rendezvous may hold the GIL
    assert rec.messages == []
    theirs.close()  # but a death still counts
    assert rec.event.wait(5.0)
    assert rec.messages == ["lost rank 0: its process ended (connection closed)"]


def test_heartbeats_keep_a_slow_but_live_peer():
    a, b = socket.socketpair()
    mon_a, rec_a = _monitor(0, {1: a}, stall_s=0.8)
    mon_b, rec_b = _monitor(1, {0: b}, stall_s=0.8)
    mon_a.arm()
    mon_b.arm()
    time.sleep(2.5)  # several stall periods with heartbeats flowing both ways
    assert not rec_a.messages and not rec_b.messages
    mon_b.close()  # a normal end: goodbye, then the connection closes
    b.close()
    time.sleep(0.5)
    assert not rec_a.messages
    mon_a.close()


def test_a_failing_peer_reports_why_instead_of_a_lost_rank():
    a, b = socket.socketpair()
    mon_a, rec_a = _monitor(0, {1: a})
    mon_b, _ = _monitor(1, {0: b})
    mon_b.announce_failure("bad --param")
    b.close()
    assert rec_a.event.wait(5.0)
    assert rec_a.messages == ["rank 1 failed: bad --param"]


def test_rank0_relays_a_loss_to_the_other_survivors():
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    mon0, rec0 = _monitor(0, {1: a1, 2: a2})
    mon1, rec1 = _monitor(1, {0: b1})
    b2.close()  # rank 2 dies
    assert rec0.event.wait(5.0) and rec1.event.wait(5.0)
    assert rec0.messages == ["lost rank 2: its process ended (connection closed)"]
    assert rec1.messages == ["lost rank 2: its process ended (connection closed) (reported by rank 0)"]


# ------------------------------------------------------------------------------------- handshake
def _serve_join(settings0: dict[str, Any], settings1: dict[str, Any], timeout: float = 10.0) -> list[Any]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    results: list[Any] = [None, None]
    deadline = time.monotonic() + timeout

    def serve() -> None:
        try:
            results[0] = liveness._serve("127.0.0.1", port, 2, settings0, deadline, timeout, url)
        except HandshakeError as exc:
            results[0] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        results[1] = liveness._join(1, "127.0.0.1", port, settings1, "rank 1", deadline, timeout, url)
    except HandshakeError as exc:
        results[1] = exc
    t.join(timeout + 5)
    return results


def test_matching_parties_meet():
    s = liveness.settings_of(2, "beaver", False)
    links, sock = _serve_join(s, s)
    assert set(links) == {1} and isinstance(sock, socket.socket)
    sock.close()
    links[1].close()


@pytest.mark.parametrize(
    ("theirs", "needle"),
    [
        ({"world_size": 3}, "rank 0 has --world-size 2, rank 1 has --world-size 3"),
        ({"protocol": "replicated"}, "rank 0 has --protocol beaver, rank 1 has --protocol replicated"),
        ({"ttp": True}, "rank 0 has no dealer (no --ttp), rank 1 has a dealer (--ttp)"),
    ],
)
def test_mismatched_settings_fail_fast_on_both_sides(theirs, needle):
    mine = liveness.settings_of(2, "beaver", False)
    start = time.monotonic()
    r0, r1 = _serve_join(mine, {**mine, **theirs})
    assert time.monotonic() - start < 5.0
    assert isinstance(r0, HandshakeError) and needle in str(r0)
    assert isinstance(r1, HandshakeError) and needle in str(r1)


def test_rank_alone_fails_after_the_rendezvous_timeout_not_three_times_it():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(HandshakeError, match="could not join the other parties .* within 1 s"):
        liveness._join(
            1, "127.0.0.1", port, {}, "rank 1", time.monotonic() + 1.0, 1.0, f"tcp://127.0.0.1:{port}"
        )
    assert 0.9 < time.monotonic() - start < 2.0


def test_rank0_alone_names_the_missing_ranks():
    port = free_port()
    with pytest.raises(HandshakeError, match=r"rank\(s\) \[1, 2\] did not join .* within 1 s"):
        liveness._serve("127.0.0.1", port, 3, {}, time.monotonic() + 1.0, 1.0, f"tcp://127.0.0.1:{port}")


def test_port_in_use_is_one_line(capsys):
    from mpckv.cli import main

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HandshakeError, match=f"rank 0 cannot listen on port {port}"):
            liveness._serve("127.0.0.1", port, 2, {}, time.monotonic() + 1, 1.0, f"tcp://127.0.0.1:{port}")
        code = main(["launch", "--parties", "2", "--port", str(port), "--", "methods"])
        err = capsys.readouterr().err
    assert_one_line_error(code, err, 2, f"--port {port} is not available")


# ------------------------------------------------------------------------------ real processes
@pytest.mark.timeout(120)
def test_cli_rank_alone_one_line_no_cpp_noise():
    url = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = mpckv(
        "party", "--rank", "1", "--world-size", "2", "--rendezvous", url, "--rendezvous-timeout", "2",
        "--pycall", "tests/faults/parties.py:generate_with_marks", "--", "x",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert_one_line_error(
        proc.returncode, proc.stderr, 2, f"rank 1 could not join the other parties at {url}"
    )
    assert elapsed < 2.0 + 30.0  # 2 s of waiting plus interpreter start-up on a loaded machine


@pytest.mark.mpc
@pytest.mark.timeout(120)
def test_cli_parties_with_different_world_sizes_fail_fast_naming_both():
    import subprocess

    from faults.helpers import ROOT, env

    url = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mpckv",
                "party",
                "--rank",
                str(r),
                "--world-size",
                ws,
                "--rendezvous",
                url,
                "--rendezvous-timeout",
                "60",
                "--pycall",
                "tests/faults/parties.py:generate_with_marks",
                "--",
                "x",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=ROOT,
        )
        for r, ws in ((0, "2"), (1, "3"))
    ]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert_one_line_error(p.returncode, err, 2, "rank 0 has --world-size 2, rank 1 has --world-size 3")
