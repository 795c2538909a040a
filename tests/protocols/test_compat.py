"""CrypTen compatibility fixes (mpckv.protocols.compat) and the party harness (mpckv.protocols.testing).

Fast in-process tests first; the multi-party checks join the shared launches of
``mpckv.protocols.testing.register_checks`` (one process start-up per configuration for the whole suite).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import sys
import tempfile
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.protocols import compat
from mpckv.protocols.testing import (
    PartyFailure,
    assert_check_passed,
    register_checks,
    run_parties,
)

LSB = 2.0**-16

# values whose stock decode is wrong (x = -m + f with 0 < f·2**16 < m) or that lose bits in float32
TRICKY = [-2 + 2**-16, -100 + 2**-10, -1e6 + 2**-16, -65536 + 2**-16, -3 + 0.5 * 2**-15]
EDGES = [-2 + 2**-16, -65536.0, -1e6, 0.0, -(2**-16), 2**-16, 2**36, -(2**36), 2**36 - 2**-16]
POWERS = [s * 2.0**k for k in range(-16, 37) for s in (1, -1)]


# ------------------------------------------------------------------------------------- in process
def test_import_crypten_is_idempotent_and_applies_every_fix():
    a = compat.import_crypten()
    b = compat.import_crypten()
    assert a is b and a.__name__ == "crypten"
    assert compat.applied_fixes() == [
        "onnx-registry-alias",
        "exact-decode",
        "contiguous-comm",
        "eq-2pc-scale1",
    ]
    assert "torch.onnx._internal.registration" in sys.modules
    assert a.encoder.FixedPointEncoder.decode is compat.exact_decode
    from crypten.mpc.primitives import replicated

    assert replicated.replicate_shares is not compat.stock("replicate_shares")


def _ring(v: float) -> torch.Tensor:
    return torch.tensor([round(v * 2**16)], dtype=torch.long)


@pytest.mark.parametrize("value", EDGES + TRICKY)
def test_exact_decode_round_trips(value):
    enc = compat.import_crypten().encoder.FixedPointEncoder()
    out = enc.decode(_ring(value))
    assert out.dtype == torch.float64
    assert out.item() == value


def test_exact_decode_powers_of_two():
    enc = compat.import_crypten().encoder.FixedPointEncoder()
    values = torch.tensor(POWERS, dtype=torch.float64)
    assert torch.equal(enc.decode((values * 2**16).long()), values)


@pytest.mark.parametrize("value", TRICKY)
def test_stock_decode_bug_is_real(value):
    enc = compat.import_crypten().encoder.FixedPointEncoder()
    stock = compat.stock_decode(enc, _ring(value)).item()
    assert stock <= value - 0.99  # one too low
    assert compat.exact_decode(enc, _ring(value)).item() == value


def test_stock_decode_loses_large_integers_in_float32():
    enc = compat.import_crypten().encoder.FixedPointEncoder()
    v = 2**30 + 1.0
    assert compat.stock_decode(enc, _ring(v)).item() != v
    assert enc.decode(_ring(v)).item() == v


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_exact_decode_is_exact_on_the_ring(t):
    enc = compat.import_crypten().encoder.FixedPointEncoder()
    out = enc.decode(torch.tensor([t], dtype=torch.long)).item()
    assert out * 2**16 == t


def test_decode_scale_one_returns_integers():
    enc = compat.import_crypten().encoder.FixedPointEncoder(precision_bits=0)
    t = torch.tensor([-3, 0, 5])
    assert torch.equal(enc.decode(t), t)
    with pytest.raises(TypeError):
        compat.exact_decode(enc, torch.tensor([1.5]))


def test_collective_timeout_bounds_init_process_group():
    import torch.distributed as dist

    compat.set_collective_timeout(1.0)
    try:
        assert compat.collective_timeout() == datetime.timedelta(seconds=1)
        assert getattr(dist.new_group, "_mpckv_timeout", False)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.monotonic()
            with pytest.raises(RuntimeError):  # rank 1 never comes: the rendezvous times out
                dist.init_process_group("gloo", init_method=f"file://{d}/rdv", world_size=2, rank=0)
            assert time.monotonic() - t0 < 30
        assert not dist.is_initialized()
    finally:
        compat.set_collective_timeout(None)


# ------------------------------------------------------------------------------------- in parties
def check_decode_through_reveal():
    crypten = compat.import_crypten()
    x = torch.tensor(TRICKY + EDGES, dtype=torch.float64)
    ring = (x * 2**16).round().long()
    share = ring if _rank() == 0 else torch.zeros_like(ring)
    assert torch.equal(crypten.mpc.MPCTensor.from_shares(share).get_plain_text(), x)
    y = crypten.cryptensor(torch.tensor([-2.0, -100.0])) + torch.tensor([2**-16, 2**-10])
    assert y.get_plain_text().tolist() == [-2 + 2**-16, -100 + 2**-10]


def _rank() -> int:
    return compat.import_crypten().communicator.get().get_rank()


def check_eq_on_integer_tensors():
    crypten = compat.import_crypten()
    a = crypten.cryptensor(torch.tensor([1.0, 2.0, 3.0])) > 1.5  # scale-1 bits [0, 1, 1]
    assert a.encoder.scale == 1
    eq = a.eq(torch.tensor([0, 1, 0]))
    assert torch.equal(eq.get_plain_text(), torch.tensor([1, 1, 0]))
    # the stock 2PC path returns 2**16 for "true" on scale-1 inputs
    stock = compat.stock("eqz_2pc")(a - torch.tensor([0, 1, 0]))
    assert torch.equal(stock.get_plain_text(), torch.tensor([65536, 65536, 0]))
    # fixed-point inputs are unaffected
    x = crypten.cryptensor(torch.tensor([0.5, -1.25]))
    assert torch.equal(x.eq(torch.tensor([0.5, 1.0])).get_plain_text(), torch.tensor([1, 0]))


def check_noncontiguous_beaver():
    crypten = compat.import_crypten()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    A, B = crypten.cryptensor(a), crypten.cryptensor(b)
    got = A.t().matmul(B).get_plain_text()
    assert (got - a.t().double() @ b.double()).abs().max() < 64 * LSB
    got = (A.t() * B[:, :3].t()).get_plain_text()
    assert (got - a.t().double() * b[:, :3].t().double()).abs().max() < 8 * LSB


def check_replicated_noncontiguous():
    """3-party replicated mul / matmul / square / truncation on transposed (non-contiguous) shares."""
    crypten = compat.import_crypten()
    assert crypten.cfg.mpc.protocol == "replicated"
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    A, B = crypten.cryptensor(a), crypten.cryptensor(b)
    At = A.t()
    assert not At.share.is_contiguous()
    mm = At.matmul(B).get_plain_text()
    mul = (At * B[:, :3].t()).get_plain_text()
    sq = At.square().get_plain_text()
    dv = At.div(3).get_plain_text()
    ref_a = a.t().double()
    assert (mm - ref_a @ b.double()).abs().max() < 64 * LSB
    assert (mul - ref_a * b[:, :3].t().double()).abs().max() < 8 * LSB
    assert (sq - ref_a**2).abs().max() < 8 * LSB
    assert (dv - ref_a / 3).abs().max() < 4 * LSB
    # Why the stock protocol crashes: it receives into ``torch.zeros_like(share)``, which keeps the
    # transposed strides, and gloo rejects non-contiguous buffers (before posting anything, so the
    # channels stay clean for the checks that follow in this launch).
    buf = torch.zeros_like(At.share)
    assert not buf.is_contiguous()
    comm = crypten.communicator.get()
    prev = (comm.get_rank() - 1) % comm.get_world_size()
    with pytest.raises(RuntimeError, match="contiguous"):
        comm.irecv(buf, src=prev)
    assert (At.square().get_plain_text() - ref_a**2).abs().max() < 8 * LSB  # still in lockstep


CHECKS_2PC = [check_decode_through_reveal, check_eq_on_integer_tensors, check_noncontiguous_beaver]
CHECKS_3PC = [check_replicated_noncontiguous]
register_checks("2pc", CHECKS_2PC, world_size=2, timeout=400)
register_checks("3pc-replicated", CHECKS_3PC, world_size=3, protocol="replicated", timeout=300)


@pytest.mark.mpc
@pytest.mark.parametrize("check", CHECKS_2PC, ids=lambda c: c.__name__)
def test_compat_in_two_parties(check):
    assert_check_passed("2pc", check)


@pytest.mark.mpc
@pytest.mark.parametrize("check", CHECKS_3PC, ids=lambda c: c.__name__)
def test_compat_in_three_parties_replicated(check):
    assert_check_passed("3pc-replicated", check)


# ------------------------------------------------------------------------------------- the harness
def party_raises_while_peer_blocks():
    crypten = compat.import_crypten()
    x = crypten.cryptensor(torch.ones(3))
    if _rank() == 1:
        raise ValueError("boom from rank 1")
    return x.get_plain_text()  # rank 0 waits for rank 1 forever (until killed)


def party_sleeps():
    time.sleep(600)


@pytest.mark.mpc
def test_run_parties_fails_fast_when_a_party_raises():
    t0 = time.monotonic()
    with pytest.raises(PartyFailure) as info:
        run_parties(party_raises_while_peer_blocks, 2, timeout=120)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "rank 1 of 2 failed" in msg and "ValueError: boom from rank 1" in msg
    assert "party_raises_while_peer_blocks" in msg  # the party's traceback
    assert elapsed < 60, elapsed
    assert not mp.active_children()


@pytest.mark.mpc
def test_run_parties_kills_everything_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match="timed out"):
        run_parties(party_sleeps, 2, timeout=2)
    assert time.monotonic() - t0 < 20
    assert not mp.active_children()


def test_run_parties_rejects_bad_arguments():
    with pytest.raises(ValueError):
        run_parties(party_sleeps, 2, protocol="replicated")
    with pytest.raises(ValueError):
        run_parties(party_sleeps, 2, protocol="spdz")
    with pytest.raises(ValueError):
        run_parties(party_sleeps, 2, rendezvous="udp")
