"""Launch CrypTen parties: ``mpckv launch`` (all parties on this host) and ``mpckv party`` (one party).

``mpckv launch --parties N [--ttp] [--protocol beaver|replicated] -- <mpckv subcommand and args>``
starts N party processes (and, with ``--ttp``, a dealer process of rank N as CrypTen expects), prefixes
every line they print with ``[rank R] `` or ``[dealer] ``, and when one of them exits non-zero or is
killed, stops the others (SIGTERM, then SIGKILL after a grace period) and exits non-zero with a
one-line error naming it. A global ``--timeout`` stops everything too. Children run
``python -m mpckv.protocols.launcher party ...``, which is ``mpckv party ...`` without the rest of the CLI.

``mpckv party --rank R --world-size N --rendezvous tcp://HOST:PORT [--ttp] -- <args>`` runs one party
(or, for ``--rank N --ttp``, the dealer) on its own host: it sets the environment CrypTen reads
(``WORLD_SIZE`` = number of parties, ``RANK``, ``RENDEZVOUS``, ``DISTRIBUTED_BACKEND=gloo``), selects the
provider (TFP, or TTP with ``--ttp``) and protocol, initialises CrypTen with a bounded rendezvous, turns
on :mod:`mpckv.protocols.comm` accounting, bounds every later collective by ``--comm-timeout``, then
runs ``mpckv.cli.main(args)`` in-process (or ``--pycall module:function``, called with ``args``).

Examples
--------
::

    mpckv launch --parties 2 -- generate --secure --model tiny --prompt "Hi"
    mpckv launch --parties 3 --protocol replicated --ttp -- bench secure
    # on two hosts:
    mpckv party --rank 0 --world-size 2 --rendezvous tcp://10.0.0.1:29500 -- generate --secure ...
    mpckv party --rank 1 --world-size 2 --rendezvous tcp://10.0.0.1:29500 -- generate --secure ...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from mpckv.errors import ConfigError, MpckvError
from mpckv.protocols import liveness
from mpckv.protocols.liveness import DEFAULT_STALL_S
from mpckv.protocols.supervisor import (
    Child,
    child_death_signal,
    free_port,
    notify_on_exit,
    pump,
    raise_interrupt,
    report,
    stop_all,
    supervise,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PartyError",
    "add_launch_parser",
    "add_party_parser",
    "launch",
    "main",
    "run_launch",
    "run_party",
    "run_party_process",
]

DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0
DEFAULT_COMM_TIMEOUT_S = 1800.0
DEFAULT_GRACE_S = 5.0
PROTOCOLS = ("beaver", "replicated")
_TTP_FUNCTIONS = ("additive", "square", "binary", "wraps", "B2A", "pm_triple", "pm_release")


class PartyError(MpckvError, RuntimeError):
    """A party could not join the others, or lost them."""


# -------------------------------------------------------------------------------------- validation
def _validate(world_size: int, protocol: str, ttp: bool) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size not in (2, 3):
        raise ConfigError(f"the number of parties must be 2 or 3, got {world_size!r}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol == "replicated" and world_size != 3:
        raise ConfigError(
            f"--protocol replicated needs exactly 3 parties (CrypTen's replicated sharing is 3PC), "
            f"got {world_size}"
        )


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return float(value)


def _command(argv: Sequence[str], pycall: str | None) -> list[str]:
    argv = list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv and pycall is None:
        raise ConfigError(
            "nothing to run: put an mpckv subcommand after `--`, e.g. "
            "`mpckv launch --parties 2 -- generate --secure --model tiny --prompt Hi`"
        )
    return argv


def launch(
    world_size: int,
    argv: Sequence[str],
    ttp: bool = False,
    protocol: str = "beaver",
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    port: int | None = None,
    pycall: str | None = None,
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT_S,
    comm_timeout: float = DEFAULT_COMM_TIMEOUT_S,
    heartbeat_timeout: float = DEFAULT_STALL_S,
    grace_s: float = DEFAULT_GRACE_S,
    env: dict[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run ``argv`` (an mpckv subcommand and its arguments) in ``world_size`` local parties.

    Parameters
    ----------
    world_size:
        Number of parties, 2 or 3 (3 for ``protocol="replicated"``).
    argv:
        What every party runs: arguments of ``mpckv.cli.main``, or of the ``pycall`` function.
    ttp:
        Also start a dealer (CrypTen's TTP provider, rank ``world_size``); otherwise TFP.
    protocol:
        ``"beaver"`` or ``"replicated"``.
    timeout:
        Wall-clock limit in seconds for the whole run; past it everything is stopped (exit 124).
    port:
        Rendezvous port on 127.0.0.1 (default: a free one).
    pycall:
        ``"module:function"`` or ``"path/to/file.py:function"`` to call instead of the CLI.
    rendezvous_timeout, comm_timeout, heartbeat_timeout:
        Passed to every party (see :func:`run_party_process`).
    grace_s:
        Seconds between SIGTERM and SIGKILL when stopping the others.
    env:
        Extra environment variables for the children.
    stdout, stderr:
        Where the prefixed lines go (default: ``sys.stdout`` / ``sys.stderr``).

    Returns
    -------
    int
        0 when every party exits 0; else the failing process's exit code (128 + signal when killed),
        124 on timeout, 130 when interrupted. A one-line ``mpckv: error: ...`` goes to ``stderr``.
    """
    _validate(world_size, protocol, ttp)
    command = _command(argv, pycall)
    _positive("timeout", timeout)
    _positive("--heartbeat-timeout", heartbeat_timeout)
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if pycall is None:
        from mpckv.cli_mpc import precheck_argv

        precheck_argv(command)  # e.g. generate --secure with a method that has no secure support
    if port is not None:
        _check_port_free("127.0.0.1", port)
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    host = "127.0.0.1"
    rendezvous = f"tcp://{host}:{port if port is not None else free_port(host)}"
    n_procs = world_size + (1 if ttp else 0)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "MPCKV_LAUNCHED": "1"}
    child_env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # no c10d/gloo warnings around our one line
    if "OMP_NUM_THREADS" not in child_env:  # do not oversubscribe the cores with n_procs parties
        child_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_procs))
    lock = threading.Lock()
    children: list[Child] = []
    events: queue.Queue[Child] = queue.Queue()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        for rank in range(n_procs):
            cmd = [sys.executable, "-m", "mpckv.protocols.launcher", "party", "--rank", str(rank)]
            cmd += ["--world-size", str(world_size), "--rendezvous", rendezvous, "--protocol", protocol]
            cmd += ["--rendezvous-timeout", str(rendezvous_timeout), "--comm-timeout", str(comm_timeout)]
            cmd += ["--heartbeat-timeout", str(heartbeat_timeout)]
            cmd += ["--ttp"] if ttp else []
            cmd += ["--pycall", pycall] if pycall is not None else []
            proc = subprocess.Popen(
                [*cmd, "--", *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_env,
                start_new_session=True,
                preexec_fn=child_death_signal if sys.platform.startswith("linux") else None,
            )
            children.append(Child("dealer" if rank == world_size else f"rank {rank}", proc))
        for c in children:
            assert c.proc.stdout is not None and c.proc.stderr is not None
            for pipe, stream in ((c.proc.stdout, out), (c.proc.stderr, err)):
                prefix = f"[{c.name}] "
                t = threading.Thread(target=pump, args=(pipe, prefix, stream, lock), daemon=True)
                t.start()
                c.threads.append(t)
            threading.Thread(target=notify_on_exit, args=(c, events), daemon=True).start()
        return supervise(children, events, world_size, timeout, grace_s, err, lock)
    except KeyboardInterrupt:
        stopped = stop_all(children, grace_s)
        report(err, lock, f"interrupted; stopped {', '.join(stopped) or 'nothing'}")
        return 130
    finally:
        stop_all(children, grace_s)
        for c in children:
            for t in c.threads:
                t.join(timeout=2.0)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--port {port} is not available on {host} ({exc.strerror or exc}); choose another port "
                "or leave --port out to use a free one"
            ) from None


# --------------------------------------------------------------------------------------------- party
def _load_callable(spec: str) -> Any:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(f"--pycall expects module:function or path/to/file.py:function, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        module_spec = importlib.util.spec_from_file_location(f"_mpckv_pycall_{path.stem}", path)
        if module_spec is None or module_spec.loader is None or not path.is_file():
            raise ConfigError(f"--pycall: cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--pycall: {target} has no function {name!r}")
    return fn


def _set_comm_timeout(seconds: float) -> None:
    """Bound every later collective of CrypTen's process groups (and of groups created later)."""
    import crypten.communicator as ccomm
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from mpckv.protocols.compat import set_collective_timeout

    set_collective_timeout(seconds)
    c = ccomm.get()
    for group in (None, c.main_group, c.ttp_group, getattr(c, "ttp_comm_group", None)):
        with contextlib.suppress(ValueError, RuntimeError, AttributeError, AssertionError):
            if group is None or dist.get_rank(group) >= 0:
                c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def _init(crypten: Any, rank: int, world_size: int, rendezvous: str, ttp: bool, seconds: float) -> None:
    from mpckv.protocols.compat import set_collective_timeout

    total = world_size + (1 if ttp else 0)
    set_collective_timeout(seconds)  # bounds the rendezvous and the collectives inside crypten.init()
    try:
        crypten.init()
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PartyError(
            f"{'dealer' if rank == world_size else f'rank {rank}'} could not join the other parties at "
            f"{rendezvous} within {seconds:g} s ({type(exc).__name__}: {detail}). Check that all {total} "
            f"processes were started with --world-size {world_size}{' --ttp' if ttp else ''} and the same "
            f"--rendezvous, that rank 0 runs and its host:port is reachable from here (firewall), or raise "
            f"--rendezvous-timeout."
        ) from exc


def _dealer_loop(crypten: Any, rank: int, comm_timeout: float) -> int:
    """CrypTen's TTPServer loop, with errors reported instead of swallowed."""
    import crypten.communicator as ccomm
    from crypten.mpc.provider.ttp_provider import TTPServer

    from mpckv.protocols.masked_matmul import install_dealer

    install_dealer()  # persistent-mask KV cache requests (pm_triple, pm_release)
    server = TTPServer.__new__(TTPServer)
    c = ccomm.get()
    server.ttp_group, server.comm_group, server.device = c.ttp_group, c.ttp_comm_group, "cpu"
    server._setup_generators()  # still under the rendezvous timeout: the parties wait for these seeds
    _set_comm_timeout(comm_timeout)
    while True:
        try:
            message = c.recv_obj(0, server.ttp_group)
        except RuntimeError as exc:
            raise PartyError(f"dealer lost party 0: {' '.join(str(exc).split())[:300]}") from exc
        if message == "terminate":
            crypten.uninit()
            return 0
        if not isinstance(message, dict) or message.get("function") not in _TTP_FUNCTIONS:
            raise PartyError(f"dealer received an unexpected request: {message!r:.200}")
        server.device = message["device"]
        result = getattr(server, message["function"])(*message["args"], **message["kwargs"])
        c.send_obj(result.size(), 0, server.ttp_group)
        c.broadcast(result, rank, server.comm_group)


def run_party_process(
    rank: int,
    world_size: int,
    rendezvous: str,
    argv: Sequence[str],
    *,
    ttp: bool = False,
    protocol: str = "beaver",
    pycall: str | None = None,
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT_S,
    comm_timeout: float = DEFAULT_COMM_TIMEOUT_S,
    heartbeat_timeout: float = DEFAULT_STALL_S,
) -> int:
    """Run one party (or the dealer, ``rank == world_size`` with ``ttp``) in this process.

    Every party must be given the same ``world_size``, ``rendezvous``, ``ttp`` and ``protocol``.
    ``rendezvous_timeout`` bounds joining the others (an unreachable peer fails with
    :class:`PartyError`), ``comm_timeout`` every later collective. With a ``tcp://`` rendezvous the
    parties first meet in :func:`mpckv.protocols.liveness.handshake` (settings compared, one-line errors)
    and keep a heartbeat: a party that dies or is silent for ``heartbeat_timeout`` seconds makes the others
    exit with status 1 and one line naming it. Returns the exit status of the CLI (or of the ``pycall``
    function: ``None`` counts as 0).
    """
    _validate(world_size, protocol, ttp)
    if not 0 <= rank < world_size + (1 if ttp else 0):
        hint = f" (rank {world_size} is the dealer and needs --ttp)" if rank == world_size else ""
        raise ConfigError(f"--rank must be in 0..{world_size - 1}{hint}, got {rank}")
    if not rendezvous.startswith(("tcp://", "file://")):
        raise ConfigError(f"--rendezvous must be tcp://HOST:PORT or file:///PATH, got {rendezvous!r}")
    _positive("--rendezvous-timeout", rendezvous_timeout)
    _positive("--comm-timeout", comm_timeout)
    _positive("--heartbeat-timeout", heartbeat_timeout)
    command = list(argv) if rank == world_size else _command(argv, pycall)
    fn = _load_callable(pycall) if pycall is not None and rank < world_size else None
    if fn is None and rank < world_size and not os.environ.get("MPCKV_LAUNCHED"):
        from mpckv.cli_mpc import precheck_argv

        precheck_argv(command)  # `mpckv launch` checked it already
    os.environ.update(
        WORLD_SIZE=str(world_size),  # parties only: CrypTen adds the dealer itself
        RANK=str(rank),
        RENDEZVOUS=rendezvous,
        DISTRIBUTED_BACKEND="gloo",
    )
    from mpckv.protocols import comm
    from mpckv.protocols.compat import import_crypten

    crypten = import_crypten()  # before the handshake: the heartbeat should not wait on imports
    monitor = None
    if rendezvous.startswith("tcp://"):
        monitor = liveness.handshake(
            rank, world_size, protocol, ttp, rendezvous, rendezvous_timeout, stall_s=heartbeat_timeout
        )

    crypten.cfg.mpc.provider = "TTP" if ttp else "TFP"
    crypten.cfg.mpc.protocol = protocol
    comm.install()
    _init(crypten, rank, world_size, rendezvous, ttp, rendezvous_timeout)
    if monitor is not None:
        monitor.arm()
    if rank == world_size:
        code = _dealer_loop(crypten, rank, comm_timeout)
        if monitor is not None:
            monitor.close()
        return code
    _set_comm_timeout(comm_timeout)
    comm.reset()
    if fn is not None:
        result = fn(command)
        code = 0 if result is None else int(result)
    else:
        from mpckv.cli import main as cli_main

        code = int(cli_main(command))
    if code == 0:
        crypten.uninit()
        if monitor is not None:
            monitor.close()
    return code


# ------------------------------------------------------------------------------------------- the CLI
def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``launch`` to an argparse subparsers object; its handler is :func:`run_launch`."""
    p = subparsers.add_parser(
        "launch",
        help="run an mpckv command in N local CrypTen parties",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--parties", type=int, required=True, metavar="N", help="2 or 3")
    p.add_argument("--ttp", action="store_true", help="add a dealer process (TTP provider; default TFP)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="beaver", help="default: beaver")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S", help="default: 3600")
    p.add_argument("--port", type=int, metavar="P", help="rendezvous port (default: a free one)")
    _common_party_options(p)
    p.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the mpckv subcommand and its arguments"
    )
    p.set_defaults(handler=run_launch)
    return p


def add_party_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``party`` to an argparse subparsers object; its handler is :func:`run_party`."""
    p = subparsers.add_parser(
        "party", help="run one CrypTen party of a multi-host run", description=run_party_process.__doc__
    )
    p.add_argument("--rank", type=int, required=True, metavar="R", help="0..N-1; N is the dealer (--ttp)")
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="number of parties, 2 or 3")
    p.add_argument("--rendezvous", required=True, metavar="URL", help="tcp://HOST:PORT of rank 0")
    p.add_argument("--ttp", action="store_true", help="a dealer process (rank N) takes part")
    p.add_argument("--protocol", choices=PROTOCOLS, default="beaver", help="default: beaver")
    _common_party_options(p)
    p.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the mpckv subcommand and its arguments"
    )
    p.set_defaults(handler=run_party)
    return p


def _common_party_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rendezvous-timeout",
        type=float,
        default=DEFAULT_RENDEZVOUS_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the other parties (default: {DEFAULT_RENDEZVOUS_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--comm-timeout",
        type=float,
        default=DEFAULT_COMM_TIMEOUT_S,
        metavar="S",
        help=f"seconds any one collective may wait (default: {DEFAULT_COMM_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=DEFAULT_STALL_S,
        metavar="S",
        help=f"a party silent this long counts as stalled and stops the run (default: {DEFAULT_STALL_S:g})",
    )
    p.add_argument(
        "--pycall",
        metavar="MODULE:FUNC",
        help="call FUNC(args) (module name or path/to/file.py) instead of the mpckv CLI",
    )


def run_launch(args: argparse.Namespace) -> int:
    """Handler of ``mpckv launch``."""
    return launch(
        args.parties,
        args.argv,
        ttp=args.ttp,
        protocol=args.protocol,
        timeout=args.timeout,
        port=args.port,
        pycall=args.pycall,
        rendezvous_timeout=args.rendezvous_timeout,
        comm_timeout=args.comm_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
    )


def run_party(args: argparse.Namespace) -> int:
    """Handler of ``mpckv party``.

    A party that fails after joining the others leaves with its exit status *at once* (``os._exit`` after
    flushing its streams): a normal interpreter exit with a live gloo process group can end in the group's
    destructor calling ``abort()``, which turned "exit 1" into SIGABRT (exit 134) on some CI runs.
    """
    try:
        code = run_party_process(
            args.rank,
            args.world_size,
            args.rendezvous,
            args.argv,
            ttp=args.ttp,
            protocol=args.protocol,
            pycall=args.pycall,
            rendezvous_timeout=args.rendezvous_timeout,
            comm_timeout=args.comm_timeout,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    except (Exception, KeyboardInterrupt) as exc:
        if not _joined() and liveness.current() is None:
            raise  # bad options or no peers: nothing to tear down, main() reports it
        _exit_now(_report_failure(exc))
    if code != 0 and _joined():
        _exit_now(code)
    return code


def _report_failure(exc: BaseException) -> int:
    """Print how the CLI failed (one line for our errors and lost parties, a traceback for bugs), tell
    the other parties why (so that they do not report a lost rank), and return the exit status."""
    monitor = liveness.current()
    if is_comm_error(exc):
        # The other end went away: the heartbeat names the rank (it usually reports first).
        lost = monitor.wait_lost(5.0) if monitor is not None else None
        detail = " ".join(str(exc).split())[:200]
        liveness.exit_with(lost or f"lost the connection to the other parties ({detail})")
    if isinstance(exc, MpckvError):
        message, code = " ".join(str(exc).split()), 2
        print(f"mpckv: error: {message}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        message, code = "interrupted", 130
        print("mpckv: interrupted", file=sys.stderr)
    else:
        message, code = f"{type(exc).__name__}: {exc}", 1
        traceback.print_exc()
    if monitor is not None:
        monitor.announce_failure(message)
    return code


def is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.distributed / gloo reporting a broken or timed-out connection."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, MpckvError):
        return False
    text = str(exc)
    return any(
        key in text
        for key in ("gloo", "Connection closed by peer", "Connection reset", "Broken pipe", "Timed out")
    )


def _joined() -> bool:
    """Whether this process holds a torch.distributed process group (joined the other parties)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def _exit_now(code: int) -> NoReturn:
    """Flush our streams and leave without interpreter teardown (see :func:`run_party`)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like the rest of the mpckv CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mpckv: error: {message} (see `{self.prog} --help`)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpckv.protocols.launcher launch|party ...`` (the same as ``mpckv launch|party``)."""
    parser = _Parser(prog="mpckv")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    add_launch_parser(sub)
    add_party_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args))
    except (MpckvError, KeyboardInterrupt) as exc:
        return _report_failure(exc)


if __name__ == "__main__":
    sys.exit(main())
