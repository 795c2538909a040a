"""The two-tier store: fetched data and byte counts against a naive reference, and the resident cache
against a set-based simulation."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.errors import ShapeError
from mpckv.plaintext.tiered_store import ResidentSlots, TieredKVStore, cold_bytes_per_step

CPU = torch.device("cpu")


def test_offload_is_a_copy_in_the_cold_tier():
    src = torch.randn(3, 5, 4)
    store = TieredKVStore(CPU)
    store.offload("v", src)
    assert store.cold["v"].data_ptr() != src.data_ptr()
    assert store.bytes_offloaded == src.numel() * src.element_size() == store.cold_bytes()
    src.add_(1.0)  # the cold copy does not follow its source
    assert not torch.equal(store.cold["v"], src)
    assert store.pin is False  # no pinning on a CPU hot tier


def test_fetch_returns_the_rows_and_counts_the_bytes_it_copied():
    gen = torch.Generator().manual_seed(0)
    cold = torch.randn(4, 10, 3, 2, generator=gen)
    store = TieredKVStore(CPU)
    store.offload("v", cold)
    rows = torch.tensor([0, 3, 3, 1])
    units = torch.tensor([9, 0, 4, 4])
    store.begin_step()
    out = store.fetch("v", rows, units)
    ref = torch.stack([cold[r, u] for r, u in zip(rows.tolist(), units.tolist(), strict=True)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert store.bytes_moved == out.numel() * out.element_size() == 4 * store.unit_bytes("v")
    store.begin_step()
    out2 = store.fetch_rows("v", torch.tensor([[1, 2], [0, 0], [5, 6], [7, 8]]))
    assert out2.shape == (4, 2, 3, 2)
    torch.testing.assert_close(out2[2, 1], cold[2, 6], rtol=0, atol=0)
    assert store.step_bytes == [4 * store.unit_bytes("v"), 8 * store.unit_bytes("v")]
    with pytest.raises(ShapeError):
        store.fetch("v", rows, units[:2])


def test_cold_bytes_per_step_sums_layers():
    a, b = TieredKVStore(CPU), TieredKVStore(CPU)
    for s in (a, b):
        s.offload("v", torch.zeros(1, 4, 8))
    for _ in range(2):
        a.begin_step()
        a.fetch("v", torch.tensor([0]), torch.tensor([1]))
        b.begin_step()
        b.fetch("v", torch.tensor([0, 0]), torch.tensor([1, 2]))
    states = [{"tier": a}, {"layer": type("S", (), {"store": b})()}, {}]
    assert cold_bytes_per_step(states) == (2 * 32 + 4 * 32) / 2
    assert cold_bytes_per_step([{}]) == 0.0


@settings(derandomize=True, deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), extra=st.integers(0, 3))
def test_resident_slots_match_a_set_simulation(seed, extra):
    """Only units not resident before are loaded; resident wanted units keep their slot; every wanted
    unit is found at the slot ``plan`` reports; the attended slots are exactly the wanted ones."""
    rng = random.Random(seed)
    rows, n_units, k = 3, 12, 4
    slots = ResidentSlots(rows, n_units, k + extra, CPU)
    resident: list[dict[int, int]] = [{} for _ in range(rows)]  # unit -> slot, the reference
    for _step in range(6):
        want = [rng.sample(range(n_units), k) for _ in range(rows)]
        pre = [rng.sample(range(n_units), extra) for _ in range(rows)]
        before = slots.unit_ids.clone()
        plan = slots.plan(torch.tensor(want), prefetch=torch.tensor(pre, dtype=torch.long).view(rows, extra))
        for r in range(rows):
            targets = set(want[r]) | set(pre[r])
            misses = targets - set(resident[r])
            got = {
                int(u)
                for rr, u in zip(plan.miss_rows.tolist(), plan.miss_units.tolist(), strict=True)
                if rr == r
            }
            assert got == misses
            ids = slots.unit_ids[r].tolist()
            for u in targets & set(resident[r]):  # hits stay in place
                assert ids[resident[r][u]] == u == int(before[r, resident[r][u]])
            for j, u in enumerate(want[r]):
                assert ids[int(plan.slot_of[r, j])] == u
            attended = {ids[s] for s in range(slots.slots) if bool(plan.attend[r, s])}
            assert attended == set(want[r])
            resident[r] = {u: s for s, u in enumerate(ids) if u >= 0}
            assert set(resident[r]) == targets


def test_resident_slots_invalid_columns_and_growth():
    slots = ResidentSlots(1, 8, 2, CPU)
    plan = slots.plan(torch.tensor([[3, 5, 0]]), torch.tensor([[True, True, False]]))
    assert slots.slots == 3
    assert plan.misses == 2 and int(plan.slot_of[0, 2]) == -1
    plan = slots.plan(torch.tensor([[5, 6, 0]]), torch.tensor([[True, True, False]]))
    assert plan.miss_units.tolist() == [6]  # 5 was resident
