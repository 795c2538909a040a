"""Communication accounting (protocols/comm.py) and the network model (protocols/netmodel.py).

The counting rules are checked twice: in-process on a fake communicator (every rule, exactly), and in
real CrypTen parties on known operations (2PC Beaver multiplication and matmul, reveal, TTP triples),
where the counted bytes are also compared with what the process really wrote (``/proc/self/io``).
"""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from mpckv.errors import ConfigError
from mpckv.protocols import comm, netmodel
from mpckv.protocols.comm import CommStats

# ------------------------------------------------------------------------------ fake communicator


class _Work:
    def __init__(self) -> None:
        self.waited = False

    def wait(self) -> None:
        self.waited = True


class _FakeComm:
    """Same method signatures as CrypTen's DistributedCommunicator, no network."""

    def __init__(self, rank: int = 0, world_size: int = 2) -> None:
        self.rank, self.world_size = rank, world_size
        self.main_group = object()
        self.ttp_group = object()

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.world_size

    def send(self, tensor, dst):
        pass

    def recv(self, tensor, src=None):
        return tensor

    def isend(self, tensor, dst):
        return _Work()

    def irecv(self, tensor, src=None):
        return _Work()

    def scatter(self, scatter_list, src, size=None, device=None):
        return scatter_list[self.rank] if scatter_list else torch.zeros(size, dtype=torch.long)

    def reduce(self, input, dst, op=None, batched=False):
        return input

    def all_reduce(self, input, op=None, batched=False):
        return input

    def gather(self, tensor, dst):
        return [tensor]

    def all_gather(self, tensor):
        return [tensor]

    def broadcast(self, input, src, group=None, batched=False):
        return input

    def barrier(self):
        pass

    def send_obj(self, obj, dst, group=None):
        pass

    def recv_obj(self, src, group=None):
        return {"size": (3, 4)}

    def broadcast_obj(self, obj, src, group=None):
        return obj if obj is not None else {"size": (3, 4)}


@pytest.fixture
def fake(monkeypatch):
    """A fake communicator class wrapped with the counters, counting enabled, counters zeroed."""
    cls = type("Fake", (_FakeComm,), {})
    for name in comm._WRAPPED:
        setattr(cls, name, comm._wrap(name, getattr(_FakeComm, name)))
    monkeypatch.setattr(comm._STATE, "enabled", True)
    comm.reset()
    yield cls
    comm.reset()


def _i64(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def test_rules_two_parties(fake):
    c0, c1 = fake(0, 2), fake(1, 2)
    c0.all_reduce(_i64(10))  # ring, P=2: n each way
    s = comm.snapshot()
    assert (s.bytes_sent, s.bytes_recv, s.rounds, s.messages) == (80, 80, 1, 2)
    comm.reset()
    c0.all_reduce([_i64(10), _i64(5)], batched=True)  # one round for the whole batch
    assert (comm.snapshot().bytes_sent, comm.snapshot().rounds) == (120, 1)
    comm.reset()
    c0.broadcast(_i64(10), 0)  # root
    c1.broadcast(_i64(10), 0)  # not root (same process here: counters add up)
    c0.gather(_i64(10), 1)
    c0.reduce(_i64(10), 0)  # root of a ring reduce: (P-1)/P n out, 2(P-1)/P n in
    s = comm.snapshot()
    assert s.bytes_sent == 80 + 0 + 80 + 40
    assert s.bytes_recv == 0 + 80 + 0 + 80
    assert s.rounds == 4


def test_rules_three_parties_and_dtypes(fake):
    c = fake(1, 3)
    c.all_reduce(_i64(300))  # ring, P=3: 2(P-1)/P n = 4n/3 each way
    c.all_gather(torch.zeros(10, dtype=torch.int32))  # real element size: 4 B
    c.send(torch.zeros(7, dtype=torch.int8), 0)
    c.reduce(_i64(300), 0)  # not the root: n out, (P-1)/P n in
    s = comm.snapshot()
    assert s.bytes_sent == 3200 + 2 * 40 + 7 + 2400
    assert s.bytes_recv == 3200 + 2 * 40 + 0 + 1600
    assert s.online_bytes == s.bytes_total == s.bytes_sent and s.offline_bytes == 0


def test_objects_count_their_pickle(fake):
    c = fake(0, 2)
    obj = {"function": "additive", "args": ((3, 4), (4, 5), "matmul")}
    c.send_obj(obj, 1)
    received = c.recv_obj(1)
    s = comm.snapshot()
    assert s.bytes_sent == len(pickle.dumps(obj)) + 4
    assert s.bytes_recv == len(pickle.dumps(received)) + 4
    assert s.rounds == 2 and s.messages == 2  # the length and the payload


def test_async_calls_share_a_round_until_waited(fake):
    c = fake(0, 3)
    reqs = [c.isend(_i64(4), 1), c.irecv(_i64(4), 2), c.isend(_i64(4), 1), c.irecv(_i64(4), 2)]
    assert comm.snapshot().rounds == 1
    for r in reqs:
        r.wait()
    assert all(r._work.waited for r in reqs)
    c.isend(_i64(4), 1)  # a new step after the wait
    assert comm.snapshot().rounds == 2
    c.all_reduce(_i64(4))  # a blocking call closes the open asynchronous round
    c.isend(_i64(4), 1)
    s = comm.snapshot()
    assert s.rounds == 4 and s.bytes_sent == 3 * 32 + 4 * 8 * 4 // 3 + 32


def test_offline_traffic_is_the_non_main_group(fake, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    c = fake(0, 2)
    c.send_obj({"function": "additive"}, 2, c.ttp_group)  # request to the dealer (rank 2)
    c.broadcast(_i64(100), 2, c.ttp_group)  # the dealer's answer: received by party 0
    c.all_reduce(_i64(10))  # online
    s = comm.snapshot()
    request = len(pickle.dumps({"function": "additive"})) + 4
    assert s.offline_bytes == request + 800  # party 0 is charged what the dealer sent it
    assert s.online_bytes == 80
    assert (s.offline_rounds, s.online_rounds, s.rounds) == (2, 1, 3)
    assert s.bytes_total == s.online_bytes + s.offline_bytes


def test_labels_innermost_wins_and_breakdowns_sum(fake):
    c = fake(0, 2)
    with comm.phase("prefill"), comm.layer(0):
        c.all_reduce(_i64(1))
        with comm.op("attention"):
            c.all_reduce(_i64(2))
            with comm.op("softmax"):
                c.all_reduce(_i64(3))
    with comm.labels(phase="decode", op="softmax", layer=1):
        c.all_reduce(_i64(4))
    c.barrier()
    s = comm.snapshot().to_dict()
    assert s["by_phase"] == {
        "decode": {"bytes": 32, "rounds": 1, "online_bytes": 32, "offline_bytes": 0, "messages": 2},
        "prefill": {"bytes": 48, "rounds": 3, "online_bytes": 48, "offline_bytes": 0, "messages": 6},
        "-": {"bytes": 0, "rounds": 1, "online_bytes": 0, "offline_bytes": 0, "messages": 0},
    }
    assert {k: v["bytes"] for k, v in s["by_op"].items()} == {"attention": 16, "softmax": 56, "-": 8}
    assert list(s["by_layer"]) == ["0", "1", "-"]
    for table in ("by_phase", "by_op", "by_layer"):
        assert sum(v["bytes"] for v in s[table].values()) == s["bytes_total"] == 80
        assert sum(v["rounds"] for v in s[table].values()) == s["rounds"] == 5


def test_paused_and_disabled_count_nothing(fake):
    c = fake(0, 2)
    with comm.paused():
        c.all_reduce(_i64(10))
    comm._STATE.enabled = False
    c.all_reduce(_i64(10))
    assert comm.snapshot().bytes_total == 0


def test_system_combination_sums_bytes_and_maxes_rounds():
    def raw(**kw: int) -> dict[str, int]:
        return {**dict.fromkeys(comm._RAW_FIELDS, 0), **kw}

    p0 = raw(on_sent=100, on_recv=100, off_sent=10, off_recv=800, on_rounds=5, off_rounds=3, on_msgs=4)
    p1 = raw(on_sent=100, on_recv=100, on_rounds=6, on_msgs=4)
    exports = [
        {"total": p0, "by_phase": {"prefill": p0}, "by_op": {}, "by_layer": {}},
        {"total": p1, "by_phase": {"prefill": p1}, "by_op": {}, "by_layer": {}},
    ]
    s = CommStats.from_exports(exports)
    assert s.scope == "system" and s.parties == 2
    assert s.bytes_total == 100 + 10 + 800 + 100
    assert (s.online_bytes, s.offline_bytes) == (200, 810)
    assert (s.rounds, s.online_rounds, s.offline_rounds) == (8, 6, 3)
    assert s.bytes_sent == s.bytes_recv == s.bytes_total  # every byte sent is received once
    assert s.max_party_bytes == 900  # party 0 receives 100 + 800
    assert s.max_party_online_bytes == 100
    assert s.by_phase["prefill"]["bytes"] == s.bytes_total


# --------------------------------------------------------------------------------- network model
def test_profiles_and_arithmetic():
    assert (netmodel.LAN.bandwidth_bps, netmodel.LAN.rtt_s) == (1e9, 0.5e-3)
    assert (netmodel.WAN.bandwidth_bps, netmodel.WAN.rtt_s) == (100e6, 40e-3)
    stats = CommStats(
        rounds=100, max_party_bytes=10_000_000, online_rounds=60, max_party_online_bytes=5_000_000
    )
    assert netmodel.modelled_seconds(stats, "lan", 1.5) == pytest.approx(1.5 + 100 * 0.5e-3 + 8e7 / 1e9)
    assert netmodel.modelled_seconds(stats, netmodel.WAN) == pytest.approx(100 * 0.04 + 8e7 / 1e8)
    online = netmodel.modelled_breakdown(stats.to_dict(), "wan", include_offline=False)
    assert online == pytest.approx(
        {"compute_s": 0.0, "latency_s": 60 * 0.04, "transfer_s": 4e7 / 1e8, "total_s": 2.4 + 0.4}
    )
    custom = netmodel.get_profile("10Gbps/0.2ms")
    assert (custom.bandwidth_bps, custom.rtt_s) == (1e10, pytest.approx(2e-4))
    assert netmodel.get_profile(" WAN ") is netmodel.WAN
    assert math.isclose(netmodel.modelled_seconds(CommStats(), "lan"), 0.0)


@pytest.mark.parametrize("spec", ["moon", "10Gbps", "fast/1ms", "1Gbps/soon", "1 parsec/1ms"])
def test_bad_profiles(spec):
    with pytest.raises(ConfigError):
        netmodel.get_profile(spec)


def test_profile_validation():
    with pytest.raises(ConfigError):
        netmodel.NetworkProfile("x", 0, 1e-3)
    with pytest.raises(ConfigError):
        netmodel.NetworkProfile("x", 1e9, -1)
    with pytest.raises(ConfigError):
        netmodel.modelled_seconds(CommStats(), "lan", compute_s=-1)
    with pytest.raises(ConfigError, match="lack"):
        netmodel.modelled_seconds({"rounds": 1}, "lan")


# ------------------------------------------------------------------------ real CrypTen parties
def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


def _measure(ttp: bool) -> dict:
    """Runs in each party: known operations, each measured from zeroed counters."""
    from mpckv.protocols.compat import import_crypten

    crypten = import_crypten()
    comm.install()
    n, (m, k, p) = 1000, (4, 32, 50)
    x = crypten.cryptensor(torch.randn(n), src=0)
    y = crypten.cryptensor(torch.randn(n), src=1)
    a = crypten.cryptensor(torch.randn(m, k), src=0)
    b = crypten.cryptensor(torch.randn(k, p), src=1)
    out: dict = {"wire": {}}
    for name, fn in (("mul", lambda: x * y), ("matmul", lambda: a.matmul(b)), ("reveal", x.get_plain_text)):
        comm.reset()
        written = _wchar() if os.path.exists("/proc/self/io") else None
        fn()
        stats = comm.snapshot()
        if written is not None:
            out["wire"][name] = (_wchar() - written, stats.bytes_sent, stats.messages)
        out[name] = stats.to_dict()
    comm.reset()
    with comm.phase("decode"), comm.layer(2), comm.op("mul"):
        z = x * y
    with comm.phase("decode"), comm.op("reveal"):
        z.get_plain_text()
    out["system"] = comm.system_totals().to_dict()
    return out


def _n_bytes(elements: int) -> int:
    return 8 * elements


@pytest.fixture(scope="module")
def tfp_run():
    from mpckv.protocols.testing import run_parties

    return run_parties(_measure, 2, args=(False,), timeout=150)


@pytest.mark.mpc
@pytest.mark.timeout(200)
def test_beaver_mul_matmul_reveal_2pc(tfp_run):
    n, (m, k, p) = 1000, (4, 32, 50)
    for party in tfp_run:
        # Beaver: open eps = x - a and delta = y - b (one batched all_reduce); 2PC truncation is local.
        assert party["mul"]["bytes_total"] == _n_bytes(2 * n)
        assert party["mul"]["rounds"] == 1
        assert party["matmul"]["bytes_total"] == _n_bytes(m * k + k * p)
        assert party["matmul"]["rounds"] == 1
        assert party["reveal"]["bytes_total"] == _n_bytes(n)
        assert party["reveal"]["rounds"] == 1
        assert party["mul"]["offline_bytes"] == 0  # TFP: no dealer


@pytest.mark.mpc
@pytest.mark.timeout(200)
def test_counted_bytes_are_what_gloo_writes(tfp_run):
    for party in tfp_run:
        for name, (written, counted, messages) in party["wire"].items():
            # gloo adds a few hundred bytes of framing per message, nothing per element
            assert counted <= written <= counted + 1024 * messages + 4096, (name, written, counted)


@pytest.mark.mpc
@pytest.mark.timeout(200)
def test_system_totals_and_labels_2pc(tfp_run):
    n = 1000
    system = tfp_run[0]["system"]
    assert system == tfp_run[1]["system"]  # every party gets the same totals
    assert system["scope"] == "system" and system["parties"] == 2
    assert system["bytes_total"] == 2 * (_n_bytes(2 * n) + _n_bytes(n))  # summed over parties
    assert system["rounds"] == 2  # max over parties, not summed
    assert system["by_op"]["mul"] == {
        "bytes": 2 * _n_bytes(2 * n),
        "rounds": 1,
        "online_bytes": 2 * _n_bytes(2 * n),
        "offline_bytes": 0,
        "messages": 8,
    }
    assert system["by_layer"]["2"]["bytes"] == 2 * _n_bytes(2 * n)
    assert system["by_layer"]["-"]["bytes"] == 2 * _n_bytes(n)
    assert list(system["by_phase"]) == ["decode"]
    assert system["by_phase"]["decode"]["bytes"] == system["bytes_total"]


@pytest.mark.mpc
@pytest.mark.timeout(200)
def test_ttp_triples_are_offline():
    from mpckv.protocols.testing import run_parties

    n = 1000
    p0, p1 = run_parties(_measure, 2, args=(True,), ttp=True, timeout=150)
    # Online traffic is the same as with TFP.
    assert p0["mul"]["online_bytes"] == p1["mul"]["online_bytes"] == _n_bytes(2 * n)
    assert p0["mul"]["online_rounds"] == p1["mul"]["online_rounds"] == 1
    # Party 0 alone talks to the dealer: request, size, then the triple's c share (n int64).
    assert _n_bytes(n) < p0["mul"]["offline_bytes"] < _n_bytes(n) + 2000
    assert p0["mul"]["offline_rounds"] == 3
    assert p1["mul"]["offline_bytes"] == 0 and p1["mul"]["offline_rounds"] == 0
    system = p0["system"]
    assert system["offline_bytes"] > _n_bytes(n)
    assert system["online_bytes"] == 2 * (_n_bytes(2 * n) + _n_bytes(n))
    assert system["bytes_total"] == system["online_bytes"] + system["offline_bytes"]
    assert system["max_party_bytes"] >= system["max_party_online_bytes"]


def _measure3() -> dict:
    """Runs in each of 3 parties: reveal and mul, with the bytes gloo really wrote."""
    from mpckv.protocols.compat import import_crypten

    crypten = import_crypten()
    comm.install()
    n = 300
    x = crypten.cryptensor(torch.randn(n), src=0)
    y = crypten.cryptensor(torch.randn(n), src=1)
    out: dict = {"rank": crypten.communicator.get().get_rank()}
    for name, fn in (("reveal", x.get_plain_text), ("mul", lambda: x * y)):
        comm.reset()
        written = _wchar()
        fn()
        stats = comm.snapshot()
        out[name] = stats.to_dict()
        out[name]["written"] = _wchar() - written
    return out


@pytest.mark.mpc
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["beaver", "replicated"])
def test_three_party_rules_match_the_wire(protocol):
    from mpckv.protocols.testing import run_parties

    n = 300
    parties = run_parties(_measure3, 3, protocol=protocol, timeout=240)
    for party in parties:
        assert party["reveal"]["bytes_sent"] == _n_bytes(n) * 4 // 3  # ring all_reduce: 2(P-1)/P n
        assert party["reveal"]["rounds"] == 1
        for name in ("reveal", "mul"):
            s = party[name]
            assert s["bytes_sent"] <= s["written"] <= s["bytes_sent"] + 1024 * s["messages"] + 4096, name
    if protocol == "replicated":
        # ABY3-style: each party sends its shares of x and y to the next party, then rank 2 sends its
        # product share to rank 1 for the 3PC truncation.
        sent = {p["rank"]: p["mul"]["bytes_sent"] for p in parties}
        assert sent == {0: _n_bytes(2 * n), 1: _n_bytes(2 * n), 2: _n_bytes(3 * n)}
        assert max(p["mul"]["rounds"] for p in parties) == 2
