"""``mpckv launch`` / ``mpckv party`` (protocols/launcher.py): real party processes on loopback.

The ``party_*`` functions at the bottom run inside the launched parties (``--pycall this_file:func``).
Each launch costs a few seconds of start-up (torch + CrypTen imports), so scenarios are few and small.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpckv.protocols import launcher

HERE = Path(__file__).resolve()
LIMIT_S = 60.0  # a failing rank must bring everything down within this


def _cli(*args: str, timeout: float = 120) -> tuple[int, str, str, float]:
    cmd = [sys.executable, "-m", "mpckv.protocols.launcher", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def _pycall(name: str) -> str:
    return f"{HERE}:{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------- without processes
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["launch", "--parties", "4", "--", "methods"], "number of parties must be 2 or 3, got 4"),
        (["launch", "--parties", "1", "--", "methods"], "number of parties must be 2 or 3, got 1"),
        (["launch", "--parties", "2", "--protocol", "replicated", "--", "methods"], "exactly 3 parties"),
        (["launch", "--parties", "2"], "nothing to run"),
        (["launch", "--parties", "2", "--timeout", "0", "--", "methods"], "timeout must be > 0"),
        (["launch", "--parties", "2", "--port", "70000", "--", "methods"], "--port must be in 1..65535"),
        (["launch", "--parties", "two", "--", "methods"], "invalid int value"),
        (["launch", "--parties", "2", "--protocol", "spdz", "--", "methods"], "invalid choice"),
        (
            ["party", "--rank", "2", "--world-size", "2", "--rendezvous", "tcp://127.0.0.1:1", "--", "x"],
            "rank 2 is the dealer and needs --ttp",
        ),
        (
            ["party", "--rank", "-1", "--world-size", "3", "--rendezvous", "tcp://127.0.0.1:1", "--", "x"],
            "--rank must be in 0..2",
        ),
        (
            ["party", "--rank", "0", "--world-size", "2", "--rendezvous", "http://h:1", "--", "x"],
            "--rendezvous must be tcp://HOST:PORT",
        ),
        (
            ["party", "--rank", "0", "--world-size", "2", "--rendezvous", "tcp://h:1", "--pycall", "nocolon"],
            "--pycall expects module:function",
        ),
        (
            [
                "party",
                "--rank",
                "0",
                "--world-size",
                "2",
                "--rendezvous",
                "tcp://h:1",
                "--comm-timeout",
                "-1",
            ],
            "--comm-timeout must be > 0",
        ),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    env_before = dict(os.environ)
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mpckv: error: ")
    assert message in err
    assert dict(os.environ) == env_before  # validation happens before the party touches anything


def test_python_api_validates():
    with pytest.raises(launcher.ConfigError, match="exactly 3 parties"):
        launcher.launch(2, ["methods"], protocol="replicated")
    with pytest.raises(launcher.ConfigError, match="unknown protocol"):
        launcher.launch(3, ["methods"], protocol="spdz")


def test_parsers_plug_into_another_cli():
    import argparse

    parser = argparse.ArgumentParser(prog="mpckv")
    sub = parser.add_subparsers(dest="command", required=True)
    launcher.add_launch_parser(sub)
    launcher.add_party_parser(sub)
    args = parser.parse_args(["launch", "--parties", "3", "--ttp", "--", "generate", "--parties", "9"])
    assert args.handler is launcher.run_launch
    assert (args.parties, args.ttp, args.protocol, args.timeout) == (3, True, "beaver", 3600.0)
    assert args.argv == ["--", "generate", "--parties", "9"]
    args = parser.parse_args(
        ["party", "--rank", "1", "--world-size", "2", "--rendezvous", "tcp://h:1", "--", "x"]
    )
    assert args.handler is launcher.run_party
    assert (args.rank, args.world_size, args.rendezvous, args.argv) == (1, 2, "tcp://h:1", ["--", "x"])


def test_global_timeout_stops_everything():
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    rc = launcher.launch(2, ["sleep"], pycall=_pycall("party_fail"), timeout=1.0, stdout=out, stderr=err)
    assert rc == 124
    assert time.monotonic() - start < LIMIT_S
    assert "mpckv: error: timed out after 1 s; stopped rank 0, rank 1" in err.getvalue()


# ------------------------------------------------------------------------------------ real parties
@pytest.mark.mpc
@pytest.mark.timeout(180)
def test_two_parties_and_dealer_run_and_prefix_output():
    rc, out, err, _ = _cli(
        "launch", "--parties", "2", "--ttp", "--pycall", _pycall("party_hello"), "--", "a", "b"
    )
    assert rc == 0, err
    for rank in (0, 1):
        assert f"[rank {rank}] hello {rank} of 2 total=140.00 args=a b\n" in out
        assert f"[rank {rank}] note from {rank} on stderr\n" in err
    assert "mpckv: error" not in err
    assert all(line.startswith(("[rank 0] ", "[rank 1] ", "[dealer] ")) for line in out.splitlines())


@pytest.mark.mpc
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_parties_replicated():
    rc, out, err, _ = _cli(
        "launch", "--parties", "3", "--protocol", "replicated", "--pycall", _pycall("party_hello"), "--", "c"
    )
    assert rc == 0, err
    for rank in (0, 1, 2):
        assert f"[rank {rank}] hello {rank} of 3 total=140.00 args=c\n" in out


@pytest.mark.mpc
@pytest.mark.timeout(180)
def test_raising_rank_stops_the_others():
    rc, out, err, elapsed = _cli("launch", "--parties", "2", "--pycall", _pycall("party_fail"), "--", "raise")
    assert rc == 1
    assert elapsed < LIMIT_S
    assert "[rank 1] " in err and "deliberate failure in rank 1" in err
    assert err.strip().splitlines()[-1] == "mpckv: error: rank 1 failed with exit code 1; stopped rank 0"
    assert "[rank 0] ready 0" in out


@pytest.mark.mpc
@pytest.mark.timeout(180)
def test_killed_rank_stops_the_others():
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    rc = launcher.launch(2, ["kill"], pycall=_pycall("party_fail"), stdout=out, stderr=err, grace_s=2.0)
    assert rc == 128 + signal.SIGKILL
    assert time.monotonic() - start < LIMIT_S
    assert "[rank 1] ready 1" in out.getvalue()
    assert "mpckv: error: rank 1 was killed by signal SIGKILL (exit -9); stopped rank 0" in err.getvalue()


@pytest.mark.mpc
@pytest.mark.timeout(120)
def test_unreachable_peer_fails_with_an_actionable_error():
    port = _free_port()  # nobody listens there
    url = f"tcp://127.0.0.1:{port}"
    rc, _, err, elapsed = _cli(
        "party",
        "--rank",
        "1",
        "--world-size",
        "2",
        "--rendezvous",
        url,
        "--rendezvous-timeout",
        "2",
        "--",
        "x",
    )
    assert rc == 2
    assert elapsed < LIMIT_S
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mpckv: error: rank 1 could not join the other parties at {url} within 2 s")
    assert "--rendezvous-timeout" in last


# ------------------------------------------------------------------- run inside the launched parties
def party_hello(argv: list[str]) -> int:
    import torch

    from mpckv.protocols.compat import import_crypten

    crypten = import_crypten()
    rank, world = crypten.communicator.get().get_rank(), crypten.communicator.get().get_world_size()
    x = crypten.cryptensor(torch.tensor([1.0, 2.0, 3.0]), src=0)
    y = crypten.cryptensor(torch.tensor([10.0, 20.0, 30.0]), src=1)
    total = float((x * y).sum().get_plain_text())  # exercises the dealer (TTP triples)
    print(f"hello {rank} of {world} total={total:.2f} args={' '.join(argv)}")
    print(f"note from {rank} on stderr", file=sys.stderr)
    return 0


def party_fail(argv: list[str]) -> None:
    from mpckv.protocols.compat import import_crypten

    crypten = import_crypten()
    rank = crypten.communicator.get().get_rank()
    print(f"ready {rank}", flush=True)
    if rank == 1 and argv[0] == "raise":
        raise RuntimeError("deliberate failure in rank 1")
    if rank == 1 and argv[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(300)  # only the launcher can stop this party in time
