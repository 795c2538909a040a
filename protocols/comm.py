"""Always-on communication accounting for CrypTen parties.

CrypTen's own counters (``cfg.communicator.verbose``) charge 8 bytes per element whatever the dtype,
count every call as a round, count nothing in-process, and mix the dealer's (TTP) traffic into rank
0's numbers (see ``shared/research/mpc_anchors.md``). This module wraps the methods of
``crypten.communicator.DistributedCommunicator`` once per process (:func:`install`) and keeps its own
counters, whatever CrypTen's verbose flag says.

Counting rules
--------------
*Bytes* are payload bytes on the wire, ``nelement * element_size`` of the real tensor (int64 shares
are 8 B, the int8 buffers of ``send_obj`` are 1 B), following what gloo actually sends (measured with
``/proc/self/io``; P = size of the process group used, at most 3 here):

=====================  ==========================================  ======================================
call                   sent by this party                          received by this party
=====================  ==========================================  ======================================
send / isend           n                                           -
recv / irecv           -                                           n
all_reduce (ring)      2(P-1)/P n                                  2(P-1)/P n
reduce (ring)          root (P-1)/P n; others n                    root 2(P-1)/P n; others (P-1)/P n
broadcast / scatter    root (P-1) n                                others n
gather                 others n                                    root (P-1) n
all_gather (ring)      (P-1) n                                     (P-1) n
send_obj / recv_obj    len(pickle) + 4 (the int32 length)          the same, at the receiver
broadcast_obj          root (P-1) (len(pickle) + 4)                others len(pickle) + 4
barrier                0                                           0
=====================  ==========================================  ======================================

Only payload is counted: gloo's TCP transport adds about 288 B of framing per message (measured with
torch 2.13), which ``messages`` lets you add back.

*Online* traffic runs between parties (CrypTen's ``main_group``); *offline* traffic is everything on
another group, i.e. the party <-> dealer link of the TTP provider (``ttp_group``, ``ttp_comm_group``),
and everything the dealer process itself does. The dealer cannot take part in the final gather, so
each party is charged for what it sends **plus what the dealer sends to it**: the per-party figures then
sum exactly to the system total.

*Rounds* are dependent communication steps of one party: every blocking call is one round (a batched
collective over a list of tensors is one round, not one per tensor); non-blocking ``isend``/``irecv``
issued back to back join one round, which closes when one of their requests is waited on or when a
blocking call follows. Protocol-level rounds are counted: gloo's ring all_reduce for 3 parties takes
several internal latency steps but counts as one round, as in the MPC literature. A barrier is a round
of 0 bytes. One TTP triple request is 3 offline rounds at party 0 (request, size, payload). The
system's rounds are the maximum over parties (parties run in lock step), its bytes the sum.

*Labels*: traffic is attributed to the innermost active label of each kind, set with
``with comm.phase("prefill"), comm.op("softmax"), comm.layer(3): ...``. Traffic outside any label of
a kind is filed under ``"-"``, so each breakdown sums to the total.

Only :class:`~crypten.communicator.DistributedCommunicator` is counted (what ``mpckv launch`` uses);
CrypTen's in-process thread mode is not. ``mpckv party`` calls :func:`install` before ``crypten.init()``
and :func:`reset` after it; other harnesses (``protocols.testing.run_parties``) should call
:func:`install` at the start of the party function.

Example
-------
::

    from mpckv.protocols import comm, netmodel

    with comm.phase("decode"), comm.layer(3), comm.op("softmax"):
        y = x.softmax(-1)
    totals = comm.system_totals()  # a collective: every party calls it
    print(totals.to_dict()["by_op"]["softmax"], netmodel.modelled_seconds(totals, "wan", compute_s=1.2))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mpckv.protocols.comm_stats import UNLABELLED, CommStats

__all__ = [
    "CommStats",
    "UNLABELLED",
    "install",
    "installed",
    "labels",
    "layer",
    "op",
    "paused",
    "phase",
    "reset",
    "snapshot",
    "system_totals",
    "uninstall",
]

_WRAPPED = (
    "send",
    "recv",
    "isend",
    "irecv",
    "scatter",
    "reduce",
    "all_reduce",
    "gather",
    "all_gather",
    "broadcast",
    "barrier",
    "send_obj",
    "recv_obj",
    "broadcast_obj",
)
_ASYNC = ("isend", "irecv")
_RAW_FIELDS = (
    "on_sent",
    "on_recv",
    "off_sent",
    "off_recv",
    "on_rounds",
    "off_rounds",
    "on_msgs",
    "off_msgs_sent",
    "off_msgs_recv",
)


def _blank() -> dict[str, int]:
    return dict.fromkeys(_RAW_FIELDS, 0)


class _State:
    """Per-process counters and label stacks (CrypTen runs one party per process, single-threaded)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phases: list[str] = []
        self.ops: list[str] = []
        self.layers: list[str] = []
        self.paused = 0
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self.total = _blank()
        self.by_phase: dict[str, dict[str, int]] = {}
        self.by_op: dict[str, dict[str, int]] = {}
        self.by_layer: dict[str, dict[str, int]] = {}
        self.async_open = False

    def targets(self) -> list[dict[str, int]]:
        keys = (
            (self.by_phase, self.phases[-1] if self.phases else UNLABELLED),
            (self.by_op, self.ops[-1] if self.ops else UNLABELLED),
            (self.by_layer, self.layers[-1] if self.layers else UNLABELLED),
        )
        return [self.total] + [table.setdefault(key, _blank()) for table, key in keys]

    def record(
        self, offline: bool, sent: int, recv: int, msgs_sent: int, msgs_recv: int, rounds: int
    ) -> None:
        pre = "off" if offline else "on"
        with self.lock:
            for c in self.targets():
                c[f"{pre}_sent"] += sent
                c[f"{pre}_recv"] += recv
                c[f"{pre}_rounds"] += rounds
                if offline:
                    c["off_msgs_sent"] += msgs_sent
                    c["off_msgs_recv"] += msgs_recv
                else:
                    c["on_msgs"] += msgs_sent

    def export(self) -> dict[str, Any]:
        with self.lock:
            return {
                "total": dict(self.total),
                "by_phase": {k: dict(v) for k, v in self.by_phase.items()},
                "by_op": {k: dict(v) for k, v in self.by_op.items()},
                "by_layer": {k: dict(v) for k, v in self.by_layer.items()},
            }


_STATE = _State()


# -------------------------------------------------------------------------------------------- labels
@contextlib.contextmanager
def _push(stack: list[str], value: str) -> Iterator[None]:
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Attribute traffic inside the block to phase ``name`` (prefill, decode, static_eviction, ...)."""
    return _push(_STATE.phases, str(name))


def op(name: str) -> contextlib.AbstractContextManager[None]:
    """Attribute traffic inside the block to operation ``name`` (softmax, matmul, selection, ...)."""
    return _push(_STATE.ops, str(name))


def layer(index: int) -> contextlib.AbstractContextManager[None]:
    """Attribute traffic inside the block to transformer layer ``index``."""
    return _push(_STATE.layers, str(int(index)))


@contextlib.contextmanager
def labels(phase: str | None = None, op: str | None = None, layer: int | None = None) -> Iterator[None]:
    """Several labels at once: ``with comm.labels(phase="decode", op="softmax", layer=2): ...``."""
    with contextlib.ExitStack() as stack:
        if phase is not None:
            stack.enter_context(_push(_STATE.phases, str(phase)))
        if op is not None:
            stack.enter_context(_push(_STATE.ops, str(op)))
        if layer is not None:
            stack.enter_context(_push(_STATE.layers, str(int(layer))))
        yield


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Do not count traffic inside the block (test-only reveals, bookkeeping collectives)."""
    _STATE.paused += 1
    try:
        yield
    finally:
        _STATE.paused -= 1


# ------------------------------------------------------------------------------------------ counters
def reset() -> None:
    """Zero this party's counters (label stacks are kept)."""
    with _STATE.lock:
        _STATE.reset()


def snapshot() -> CommStats:
    """This party's counters since the last :func:`reset`."""
    rank = None
    communicator = _communicator()
    if communicator is not None:
        rank = int(communicator.get_rank())
    return CommStats.from_exports([_STATE.export()], rank=rank)


def system_totals() -> CommStats:
    """Gather every party's counters to every party and combine them (bytes summed, rounds max).

    A collective over the parties (not the dealer): every party must call it, in the same place. Its
    own traffic is not counted.
    """
    import torch.distributed as dist

    communicator = _communicator()
    if communicator is None or not dist.is_initialized():
        raise RuntimeError("system_totals() needs an initialised CrypTen party (crypten.init())")
    world = int(communicator.get_world_size())
    if int(communicator.get_rank()) >= world:
        raise RuntimeError("system_totals() is for parties; the dealer (TTP) does not take part")
    exports: list[Any] = [None] * world
    dist.all_gather_object(exports, _STATE.export(), group=communicator.main_group)
    return CommStats.from_exports(exports)


# ---------------------------------------------------------------------------------------- patching
def _communicator() -> Any:
    """The live DistributedCommunicator, or ``None``."""
    module = sys.modules.get("crypten.communicator.distributed_communicator")
    if module is None:
        return None
    cls = module.DistributedCommunicator
    return cls.instance if cls.is_initialized() else None


def _nbytes(t: Any) -> int:
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    data = getattr(t, "data", t)
    return int(data.nelement()) * int(data.element_size())


def _count(t: Any) -> int:
    return len(t) if isinstance(t, list | tuple) else 1


def _obj_bytes(obj: Any) -> int:
    return len(pickle.dumps(obj)) + 4  # payload + the int32 length message


class _TrackedWork:
    """A request of isend/irecv: waiting on it closes the open asynchronous round."""

    def __init__(self, work: Any) -> None:
        self._work = work

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        _STATE.async_open = False
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _traffic(name: str, me: int, size: int, a: dict[str, Any], result: Any) -> tuple[int, int, int, int]:
    """``(sent, received, messages sent, messages received)`` of one call (see the module docstring)."""
    p1 = size - 1
    if name in ("send", "isend"):
        return _nbytes(a["tensor"]), 0, 1, 0
    if name in ("recv", "irecv"):
        return 0, _nbytes(a["tensor"]), 0, 1
    if name == "all_reduce":
        n, k = _nbytes(a["input"]), _count(a["input"])
        return 2 * p1 * n // size, 2 * p1 * n // size, 2 * p1 * k, 2 * p1 * k
    if name == "reduce":
        n, k = _nbytes(a["input"]), _count(a["input"])
        if a["dst"] == me:
            return p1 * n // size, 2 * p1 * n // size, p1 * k, 2 * p1 * k
        return n, p1 * n // size, size * k, p1 * k
    if name == "broadcast":
        n, k = _nbytes(a["input"]), _count(a["input"])
        return (p1 * n, 0, p1 * k, 0) if a["src"] == me else (0, n, 0, k)
    if name == "scatter":
        if a["src"] == me:
            others = [t for i, t in enumerate(a["scatter_list"]) if i != me]
            return _nbytes(others), 0, len(others), 0
        return 0, _nbytes(result), 0, 1
    if name == "gather":
        n = _nbytes(a["tensor"])
        return (0, p1 * n, 0, p1) if a["dst"] == me else (n, 0, 1, 0)
    if name == "all_gather":
        n = _nbytes(a["tensor"])
        return p1 * n, p1 * n, p1, p1
    if name == "send_obj":
        return _obj_bytes(a["obj"]), 0, 2, 0
    if name == "recv_obj":
        return 0, _obj_bytes(result), 0, 2
    if name == "broadcast_obj":
        if a["src"] == me:
            return p1 * _obj_bytes(a["obj"]), 0, 2 * p1, 0
        return 0, _obj_bytes(result), 0, 2
    return 0, 0, 0, 0  # barrier


def _wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _STATE.enabled or _STATE.paused or self.get_world_size() < 2:
            return method(self, *args, **kwargs)
        import torch.distributed as dist

        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        group = a.get("group")
        me = int(self.get_rank())
        offline = me >= self.get_world_size() or (group is not None and group is not self.main_group)
        size = dist.get_world_size(group) if group is not None else int(self.get_world_size())
        is_async = name in _ASYNC
        with _STATE.lock:
            new_round = not (is_async and _STATE.async_open)
            _STATE.async_open = is_async
        result = method(self, *args, **kwargs)
        sent, recv, msent, mrecv = _traffic(name, me, size, a, result)
        _STATE.record(offline, sent, recv, msent, mrecv, 1 if new_round else 0)
        return _TrackedWork(result) if is_async and result is not None else result

    return counted


def _communicator_class() -> Any:
    module = sys.modules.get("crypten.communicator.distributed_communicator")
    if module is None:
        from mpckv.protocols.compat import import_crypten

        import_crypten()
        module = sys.modules["crypten.communicator.distributed_communicator"]
    return module.DistributedCommunicator


# name -> (our wrapper, the method it wraps); kept here rather than as a function attribute, because
# other wrappers (compat's) copy function attributes with functools.wraps.
_INSTALLED: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _is_ours(method: Any) -> bool:
    """Whether ``method`` is one of our wrappers or wraps one (``functools.wraps`` chain)."""
    ours = {id(w) for w, _ in _INSTALLED.values()}
    seen = 0
    while method is not None and seen < 16:
        if id(method) in ours:
            return True
        method, seen = getattr(method, "__wrapped__", None), seen + 1
    return False


def installed() -> bool:
    """Whether the counting wrappers are in place."""
    module = sys.modules.get("crypten.communicator.distributed_communicator")
    if module is None or not _INSTALLED:
        return False
    cls = module.DistributedCommunicator
    return all(_is_ours(cls.__dict__[name]) for name in _WRAPPED)


def install() -> None:
    """Wrap CrypTen's DistributedCommunicator methods with the counters (idempotent).

    Imports CrypTen through :func:`mpckv.protocols.compat.import_crypten` if it is not imported yet.
    Call it before the traffic to count (``mpckv party`` does it before ``crypten.init()``); in a test
    harness that initialises CrypTen itself, call it first thing in the party function.
    """
    cls = _communicator_class()
    with _STATE.lock:
        _STATE.enabled = True
        for name in _WRAPPED:
            method = cls.__dict__[name]
            if not _is_ours(method):
                wrapper = _wrap(name, method)
                _INSTALLED[name] = (wrapper, method)
                setattr(cls, name, wrapper)


def uninstall() -> None:
    """Stop counting; remove our wrappers where they are still the outermost ones."""
    _STATE.enabled = False
    module = sys.modules.get("crypten.communicator.distributed_communicator")
    if module is None:
        return
    cls = module.DistributedCommunicator
    with _STATE.lock:
        for name, (wrapper, original) in list(_INSTALLED.items()):
            if cls.__dict__.get(name) is wrapper:
                setattr(cls, name, original)
                del _INSTALLED[name]
