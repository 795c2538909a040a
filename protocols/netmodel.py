"""Analytic network model: turn counted communication into LAN / WAN time.

``T = compute_s + rounds * RTT + bytes / bandwidth`` where

* ``rounds`` is the system's dependent rounds (:attr:`CommStats.rounds`, the maximum over parties: the
  parties run in lock step, so each round costs one round trip of latency), and
* ``bytes`` is :attr:`CommStats.max_party_bytes`, the load of the busiest endpoint, ``max(sent,
  received)`` over processes: every process has its own full-duplex link of the profile's bandwidth, so
  the transfer time is set by the endpoint that moves the most bytes in one direction, not by the system
  total (which double-counts traffic that flows in parallel on different links).

The dealer's (TTP) traffic is included by default, because CrypTen fetches triples on demand, on the
critical path; ``include_offline=False`` models a deployment whose preprocessing ran ahead of time
(online rounds, and the busiest party's online bytes).

This is the usual first-order model of the private-inference literature (latency per round plus a
bandwidth term). It ignores computation overlapping communication, TCP slow start and per-message
framing (about 288 B per gloo message; see :mod:`mpckv.protocols.comm`).

Profiles
--------
``lan``: 1 Gbps, 0.5 ms RTT; ``wan``: 100 Mbps, 40 ms RTT. Both lie in the ranges the private
transformer inference papers use (``shared/research/mpc_anchors.md`` §(c): LAN 1-10 Gbps with
0.1-0.5 ms RTT, WAN 100-400 Mbps with 20-80 ms RTT); we take the slow end of the bandwidth range and a
mid-range WAN latency, so modelled times are conservative rather than flattering. Other settings:
``get_profile("10Gbps/0.1ms")`` or ``NetworkProfile("mine", 2.5e9, 2e-4)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mpckv.errors import ConfigError

__all__ = [
    "LAN",
    "PROFILES",
    "WAN",
    "NetworkProfile",
    "get_profile",
    "modelled_breakdown",
    "modelled_seconds",
]

_BANDWIDTH_UNITS = {"bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclasses.dataclass(frozen=True)
class NetworkProfile:
    """A network between the parties.

    Parameters
    ----------
    name:
        Label used in reports.
    bandwidth_bps:
        Bandwidth of each party's link, in **bits** per second, per direction (full duplex).
    rtt_s:
        Round-trip time in seconds, charged once per dependent round.
    """

    name: str
    bandwidth_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth_bps, int | float) and math.isfinite(self.bandwidth_bps)):
            raise ConfigError(f"bandwidth_bps must be a finite number, got {self.bandwidth_bps!r}")
        if self.bandwidth_bps <= 0:
            raise ConfigError(f"bandwidth_bps must be > 0, got {self.bandwidth_bps}")
        if not (isinstance(self.rtt_s, int | float) and math.isfinite(self.rtt_s)) or self.rtt_s < 0:
            raise ConfigError(f"rtt_s must be a finite number >= 0, got {self.rtt_s!r}")

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "bandwidth_bps", "rtt_s"}``."""
        return dataclasses.asdict(self)


LAN = NetworkProfile("lan", 1e9, 0.5e-3)
WAN = NetworkProfile("wan", 100e6, 40e-3)
PROFILES: dict[str, NetworkProfile] = {"lan": LAN, "wan": WAN}


def _parse_quantity(text: str, units: dict[str, float], what: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*", text.lower())
    if m is None or m.group(2) not in units:
        raise ConfigError(f"cannot read {what} {text!r}; use a number and one of {', '.join(units)}")
    return float(m.group(1)) * units[m.group(2)]


def get_profile(spec: str | NetworkProfile) -> NetworkProfile:
    """A profile by name (``"lan"``, ``"wan"``) or from ``"<bandwidth>/<rtt>"``, e.g. ``"10Gbps/0.2ms"``."""
    if isinstance(spec, NetworkProfile):
        return spec
    key = str(spec).strip().lower()
    if key in PROFILES:
        return PROFILES[key]
    bandwidth, sep, rtt = key.partition("/")
    if not sep:
        raise ConfigError(
            f"unknown network profile {spec!r}; use {', '.join(PROFILES)} or '<bandwidth>/<rtt>' "
            "such as '10Gbps/0.2ms'"
        )
    return NetworkProfile(
        key,
        _parse_quantity(bandwidth, _BANDWIDTH_UNITS, "bandwidth"),
        _parse_quantity(rtt, _TIME_UNITS, "round-trip time"),
    )


def _field(stats: Any, name: str) -> int:
    value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
    if value is None:
        raise ConfigError(f"communication stats lack {name!r}; pass a CommStats or its to_dict()")
    return int(value)


def modelled_breakdown(
    stats: Any, profile: str | NetworkProfile, compute_s: float = 0.0, *, include_offline: bool = True
) -> dict[str, float]:
    """The terms of :func:`modelled_seconds`: ``compute_s``, ``latency_s``, ``transfer_s``, ``total_s``."""
    prof = get_profile(profile)
    if not (math.isfinite(compute_s) and compute_s >= 0):
        raise ConfigError(f"compute_s must be a finite number >= 0, got {compute_s}")
    if include_offline:
        rounds, nbytes = _field(stats, "rounds"), _field(stats, "max_party_bytes")
    else:
        rounds, nbytes = _field(stats, "online_rounds"), _field(stats, "max_party_online_bytes")
    latency = rounds * prof.rtt_s
    transfer = nbytes * 8.0 / prof.bandwidth_bps
    return {
        "compute_s": float(compute_s),
        "latency_s": latency,
        "transfer_s": transfer,
        "total_s": float(compute_s) + latency + transfer,
    }


def modelled_seconds(
    stats: Any, profile: str | NetworkProfile, compute_s: float = 0.0, *, include_offline: bool = True
) -> float:
    """Modelled wall time ``compute_s + rounds * RTT + max_party_bytes * 8 / bandwidth_bps``.

    Parameters
    ----------
    stats:
        A :class:`~mpckv.protocols.comm.CommStats` (normally :func:`~mpckv.protocols.comm.system_totals`)
        or its ``to_dict()``.
    profile:
        A :class:`NetworkProfile`, ``"lan"``, ``"wan"`` or ``"<bandwidth>/<rtt>"``.
    compute_s:
        Local computation time, e.g. the measured wall time minus the time spent inside communication
        (on loopback it is close to the measured wall time).
    include_offline:
        Count the dealer's traffic too (default; CrypTen fetches triples on demand).
    """
    return modelled_breakdown(stats, profile, compute_s, include_offline=include_offline)["total_s"]
