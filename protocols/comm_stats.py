"""Communication totals of one party or of the whole system: :class:`CommStats`.

The counters themselves are kept by :mod:`mpckv.protocols.comm` (which wraps CrypTen's communicator);
this module turns the raw per-party counters into the reported fields and per-label tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["UNLABELLED", "CommStats"]

UNLABELLED = "-"
"""The label of traffic outside any ``comm.phase`` / ``comm.op`` / ``comm.layer`` block."""


def _label_entry(raws: list[dict[str, int]]) -> dict[str, int]:
    """Bytes / rounds of one label over the given parties (bytes summed, rounds max)."""
    return {
        "bytes": sum(r["on_sent"] + r["off_sent"] + r["off_recv"] for r in raws),
        "rounds": max((r["on_rounds"] + r["off_rounds"] for r in raws), default=0),
        "online_bytes": sum(r["on_sent"] for r in raws),
        "offline_bytes": sum(r["off_sent"] + r["off_recv"] for r in raws),
        "messages": sum(r["on_msgs"] + r["off_msgs_sent"] + r["off_msgs_recv"] for r in raws),
    }


@dataclasses.dataclass
class CommStats:
    """Communication of one party (:func:`~mpckv.protocols.comm.snapshot`) or of the whole system
    (:func:`~mpckv.protocols.comm.system_totals`).

    Attributes
    ----------
    bytes_total:
        Payload bytes: for a party, what it sent plus what the dealer sent to it; for the system, every
        byte that crossed any link, once (sum over parties).
    rounds:
        Dependent rounds, online plus offline (system: maximum over parties).
    online_bytes, offline_bytes, online_rounds, offline_rounds:
        The same split into party <-> party (online) and party <-> dealer (offline) traffic.
    messages:
        Point-to-point messages sent (by the party, and by the dealer to it).
    bytes_sent, bytes_recv:
        What this party put on / took off the wire (system: sums over every process, the dealer too).
    max_party_bytes, max_party_online_bytes:
        Load of the busiest endpoint, ``max(sent, received)`` over processes (the dealer included for
        the first): what a full-duplex link of a given bandwidth must carry; used by the network model.
    parties:
        Number of parties summed (1 for a snapshot).
    scope:
        ``"party"`` or ``"system"``.
    rank:
        The party's rank for a snapshot, ``None`` for the system.
    by_phase, by_op, by_layer:
        ``{label: {"bytes", "rounds", "online_bytes", "offline_bytes", "messages"}}``, with the same
        rules; traffic outside any label of a kind is under ``"-"``.
    """

    bytes_total: int = 0
    rounds: int = 0
    online_bytes: int = 0
    offline_bytes: int = 0
    online_rounds: int = 0
    offline_rounds: int = 0
    messages: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    max_party_bytes: int = 0
    max_party_online_bytes: int = 0
    parties: int = 1
    scope: str = "party"
    rank: int | None = None
    by_phase: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    by_op: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    by_layer: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints and strings)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_exports(cls, exports: list[dict[str, Any]], rank: int | None = None) -> CommStats:
        """Combine raw counters of one or more parties (``_State.export`` of :mod:`mpckv.protocols.comm`)."""
        totals = [e["total"] for e in exports]
        overall = _label_entry(totals)
        dealer_sent = sum(t["off_recv"] for t in totals)
        dealer_recv = sum(t["off_sent"] for t in totals)
        sent = [t["on_sent"] + t["off_sent"] for t in totals]
        recv = [t["on_recv"] + t["off_recv"] for t in totals]
        loads = [max(s, r) for s, r in zip(sent, recv, strict=True)]
        if len(exports) > 1:
            loads.append(max(dealer_sent, dealer_recv))
        system = len(exports) > 1

        def table(kind: str) -> dict[str, dict[str, int]]:
            keys = sorted({k for e in exports for k in e[kind]}, key=_label_sort_key)
            return {k: _label_entry([e[kind][k] for e in exports if k in e[kind]]) for k in keys}

        return cls(
            bytes_total=overall["bytes"],
            rounds=overall["rounds"],
            online_bytes=overall["online_bytes"],
            offline_bytes=overall["offline_bytes"],
            online_rounds=max(t["on_rounds"] for t in totals),
            offline_rounds=max(t["off_rounds"] for t in totals),
            messages=overall["messages"],
            bytes_sent=sum(sent) + (dealer_sent if system else 0),
            bytes_recv=sum(recv) + (dealer_recv if system else 0),
            max_party_bytes=max(loads),
            max_party_online_bytes=max(max(t["on_sent"], t["on_recv"]) for t in totals),
            parties=len(exports),
            scope="system" if system else "party",
            rank=rank,
            by_phase=table("by_phase"),
            by_op=table("by_op"),
            by_layer=table("by_layer"),
        )


def _label_sort_key(key: str) -> tuple[int, int, str]:
    if key == UNLABELLED:
        return (2, 0, key)
    return (0, int(key), key) if key.lstrip("-").isdigit() else (1, 0, key)
