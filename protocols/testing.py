"""Run a function in real CrypTen party processes, for tests (CrypTen's ``MultiProcessTestCase`` style).

:func:`run_parties` spawns ``world_size`` party processes (and, with ``ttp=True``, a dealer process at
rank ``world_size`` running CrypTen's ``TTPServer``), rendezvous over gloo on a private ``file://`` store
(or ``tcp://127.0.0.1:<free port>``), calls ``crypten.init()`` with the chosen provider and protocol in
each party, runs ``fn(*args)`` and returns the per-rank results. Nothing hangs:

* the first rank that raises makes the parent kill every process and raise an ``AssertionError`` with
  that rank's traceback;
* at ``timeout`` seconds after launch every live process prints its Python stacks to stderr
  (``faulthandler`` on SIGUSR1), then is killed, and the error says which ranks were still running;
* every process group gets the same timeout (:func:`mpckv.protocols.compat.set_collective_timeout`), so a
  party blocked on a dead peer also fails by itself.

``fn`` and ``args`` must be picklable (a module-level function: processes are spawned, not forked).

Hypothesis inside parties: decorate the inner property with :func:`party_settings` (``derandomize=True``,
no database, no deadline, no timing health check, no shrinking) so every party draws the same examples
in the same order, and reveal (``get_plain_text()``) to all parties before asserting, so an assertion
fails on every party at once. :func:`run_checks` batches many named checks into one launch, because
process start-up (importing torch and CrypTen) dominates the cost of small tests.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "run_parties",
    "run_checks",
    "register_checks",
    "check_report",
    "assert_check_passed",
    "party_settings",
    "PartyFailure",
    "secure_generation_party",
]

_PROTOCOLS = ("beaver", "replicated")


class PartyFailure(AssertionError):
    """A party raised, died or timed out; the message carries the party's traceback."""


def party_settings(max_examples: int = 10, **overrides: Any) -> Any:
    """Hypothesis settings under which every party draws the same examples (see module docstring)."""
    from hypothesis import HealthCheck, Phase, settings

    kw: dict[str, Any] = dict(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=max_examples,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate),
        print_blob=False,
    )
    kw.update(overrides)
    return settings(**kw)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _party_main(
    rank: int,
    world_size: int,
    rendezvous: str,
    protocol: str,
    ttp: bool,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    """Entry point of one spawned process (module level so that spawn can import it)."""
    os.environ.update(
        {
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "RENDEZVOUS": rendezvous,
            "DISTRIBUTED_BACKEND": "gloo",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    status, payload = "ok", None
    with contextlib.suppress(Exception):  # the parent asks for stack dumps before killing at the timeout
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        import torch

        torch.set_num_threads(1)
        from mpckv.protocols.compat import import_crypten, set_collective_timeout

        set_collective_timeout(timeout)
        crypten = import_crypten()
        crypten.cfg.mpc.provider = "TTP" if ttp else "TFP"
        crypten.cfg.mpc.protocol = protocol
        if rank == world_size:  # the dealer: serves triples until party 0 sends "terminate"
            from crypten.mpc.provider.ttp_provider import TTPServer

            TTPServer()
        else:
            crypten.init()
            torch.manual_seed(1234 + rank)
            payload = fn(*args)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        status, payload = "err", traceback.format_exc()
    try:
        results.put((rank, status, payload))
    except Exception:  # unpicklable result
        results.put((rank, "err", "result could not be pickled:\n" + traceback.format_exc()))
    results.close()
    results.join_thread()
    if status == "err":
        os._exit(1)
    # Stay alive until the parent has every result and kills us: exiting now could reset sockets that a
    # slower peer is still reading from. The parent's kill also stops the dealer.
    while True:
        time.sleep(60)


def _dump_stacks(procs: Sequence[Any]) -> None:
    """Ask live parties to print their Python stacks to stderr (faulthandler), for the timeout report."""
    live = [p for p in procs if p.pid is not None and p.is_alive()]
    for p in live:
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGUSR1)
    if live:
        time.sleep(0.5)


def _kill_all(procs: Sequence[Any]) -> None:
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.kill()
    for p in started:
        p.join(timeout=5)


def run_parties(
    fn: Callable[..., Any],
    world_size: int,
    *,
    protocol: str = "beaver",
    ttp: bool = False,
    timeout: float = 120,
    args: tuple[Any, ...] = (),
    rendezvous: str = "file",
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` CrypTen parties; return the list of per-rank return values.

    Parameters
    ----------
    fn:
        A picklable (module-level) callable; it runs after ``crypten.init()`` in every party.
    world_size:
        Number of computing parties (2 or 3 in tests; ``replicated`` needs exactly 3).
    protocol:
        ``"beaver"`` or ``"replicated"`` (``cfg.mpc.protocol``).
    ttp:
        Use the ``TTP`` provider with a dealer process at rank ``world_size``; otherwise ``TFP`` (party 0
        deals: insecure, for measurement and tests).
    timeout:
        Seconds for the whole run, start-up included, and for each collective inside it.
    rendezvous:
        ``"file"`` (a fresh temp file, no port race) or ``"tcp"`` (127.0.0.1 and a free port).

    Raises
    ------
    PartyFailure (an AssertionError)
        When a party raises, dies or the timeout expires; every process is killed first.
    """
    if protocol not in _PROTOCOLS:
        raise ValueError(f"protocol must be one of {_PROTOCOLS}, got {protocol!r}")
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if protocol == "replicated" and world_size != 3:
        raise ValueError("the replicated protocol needs world_size == 3")
    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="mpckv-parties-")
    if rendezvous == "file":
        url = "file://" + os.path.join(tmpdir, "rendezvous")
    elif rendezvous == "tcp":
        url = f"tcp://127.0.0.1:{_free_port()}"
    else:
        raise ValueError(f"rendezvous must be 'file' or 'tcp', got {rendezvous!r}")
    results = ctx.Queue()
    n_proc = world_size + (1 if ttp else 0)
    procs = [
        ctx.Process(
            target=_party_main,
            args=(rank, world_size, url, protocol, ttp, timeout, fn, args, results),
            name=f"mpckv-party-{rank}",
            daemon=True,
        )
        for rank in range(n_proc)
    ]
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    reported: set[int] = set()
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                running = [r for r in range(world_size) if r not in out]
                _dump_stacks(procs)
                raise PartyFailure(
                    f"run_parties timed out after {timeout:g} s; ranks still running: {running}"
                )
            try:
                rank, status, payload = results.get(timeout=min(0.2, left))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if not dead:
                    continue
                try:  # it may have reported just before exiting
                    rank, status, payload = results.get(timeout=1.0)
                except queue_mod.Empty:
                    raise PartyFailure(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} without reporting"
                    ) from None
            reported.add(rank)
            if status != "ok":
                role = "dealer" if rank == world_size else "rank"
                raise PartyFailure(f"{role} {rank} of {world_size} failed:\n{payload}")
            if rank < world_size:
                out[rank] = payload
    finally:
        _kill_all(procs)
        results.close()
        results.cancel_join_thread()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return [out[r] for r in range(world_size)]


def secure_generation_party(
    model_dir: str, prompt: list[int], new_tokens: int, method: Any
) -> dict[str, Any]:
    """One party of a private generation with ``method`` (persistent KV cache), for ``run_parties``.

    Returns what the parity tests compare with plaintext: the rank, the tokens (party 1 only), kept and read
    entries per layer, the audited openings as ``(shape, destination)`` and the bytes per operation.
    """
    from mpckv.protocols import audit
    from mpckv.protocols.secure_generate import secure_generate

    with audit.recording() as log:
        run = secure_generate(model_dir, prompt, new_tokens, method, kv_cache="persistent")
    return {
        "rank": run.rank,
        "tokens": run.tokens,
        "kept": run.stats.kept_per_layer,
        "read": run.stats.read_per_layer,
        "reveals": [(e.shape, e.dst) for e in log],
        "by_op": {k: v["bytes"] for k, v in run.comm.by_op.items()},
    }


def _check_name(check: Callable[..., Any]) -> str:
    return f"{getattr(check, '__module__', '?')}.{getattr(check, '__qualname__', repr(check))}"


def _run_checks_entry(checks: Sequence[Callable[[], Any]]) -> dict[str, tuple[str | None, float]]:
    report: dict[str, tuple[str | None, float]] = {}
    for check in checks:
        t0 = time.perf_counter()
        try:
            check()
            tb = None
        except Exception:
            tb = traceback.format_exc()
        report[_check_name(check)] = (tb, time.perf_counter() - t0)
    return report


def run_checks(
    checks: Sequence[Callable[[], Any]],
    world_size: int = 2,
    **kwargs: Any,
) -> dict[str, tuple[str | None, float]]:
    """Run many checks in one launch; return ``{"module.name": (None | traceback, seconds)}`` (rank 0).

    A check that fails on every party (the usual case when asserting on revealed values) is reported and
    the next check runs; a check that fails on some parties only desynchronises them, which the collective
    timeout turns into a ``PartyFailure`` for the whole batch. The ranks must agree on which checks
    passed. ``kwargs`` go to :func:`run_parties`.
    """
    reports = run_parties(_run_checks_entry, world_size, args=(list(checks),), **kwargs)
    first = reports[0]
    verdict = {k: v[0] is None for k, v in first.items()}
    for r, rep in enumerate(reports[1:], start=1):
        if {k: v[0] is None for k, v in rep.items()} != verdict:
            raise PartyFailure(f"ranks 0 and {r} disagree on which checks passed: {first} vs {rep}")
    return first


# A process-wide registry lets every test module add its checks to one shared launch per configuration
# (modules register at import, i.e. during pytest collection; the first test to need a report runs the
# batch). Process start-up dominates small MPC tests, so this is what keeps the suite fast.
_REGISTRY: dict[str, tuple[dict[str, Any], dict[str, Callable[[], Any]]]] = {}
_REPORTS: dict[str, dict[str, tuple[str | None, float]] | PartyFailure] = {}


def register_checks(key: str, checks: Sequence[Callable[[], Any]], **launch: Any) -> None:
    """Add module-level ``checks`` to the shared launch ``key`` (``launch`` = :func:`run_checks` kwargs).

    Every registration of one key must use the same launch arguments (``world_size``, ``protocol``...).
    """
    if key in _REPORTS:
        raise RuntimeError(f"checks for {key!r} already ran; register at import time")
    spec, registered = _REGISTRY.setdefault(key, (dict(launch), {}))
    if spec != launch:
        raise ValueError(f"launch {key!r} registered with {spec}, now with {launch}")
    for check in checks:
        registered[_check_name(check)] = check


def check_report(key: str) -> dict[str, tuple[str | None, float]]:
    """Run the shared launch ``key`` once (all checks registered so far) and return its report."""
    if key not in _REPORTS:
        spec, registered = _REGISTRY[key]
        try:
            _REPORTS[key] = run_checks(list(registered.values()), **spec)
        except PartyFailure as exc:
            _REPORTS[key] = exc
    rep = _REPORTS[key]
    if isinstance(rep, PartyFailure):
        raise PartyFailure(f"shared launch {key!r} failed:\n{rep}")
    return rep


def assert_check_passed(key: str, check: Callable[[], Any]) -> float:
    """Raise ``AssertionError`` with the party traceback unless ``check`` passed; return its seconds."""
    tb, seconds = check_report(key)[_check_name(check)]
    if tb is not None:
        raise AssertionError(f"{_check_name(check)} failed in the parties:\n{tb}")
    return seconds
