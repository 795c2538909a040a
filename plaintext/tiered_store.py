"""A two-tier store for offloading KV methods: a hot tier (the compute device) and a cold tier.

Offloading selectors (ShadowKV's values, A²ATS's full K/V) keep most of the prompt's entries in *cold*
memory and copy only what a decode step selects into *hot* memory. On CUDA the cold tier is pinned host
memory (copies are asynchronous with respect to the host); on CPU it is a separate buffer, so the copy is
real and measurable even without a GPU.

Two parts:

* :class:`TieredKVStore` — named cold arrays ``[R, n_units, *unit]`` (``R`` rows = sequence × KV head),
  :meth:`~TieredKVStore.fetch` of ``(row, unit)`` pairs into the hot tier, and byte accounting: every
  fetch adds the bytes of the tensor it actually copied to the current step's counter
  (:meth:`~TieredKVStore.begin_step` opens a step; :attr:`~TieredKVStore.bytes_moved` totals decode
  copies, :attr:`~TieredKVStore.bytes_offloaded` what :meth:`~TieredKVStore.offload` wrote cold).
* :class:`ResidentSlots` — the hot tier's temporal cache of units (ShadowKV's "chunks already on the GPU
  are kept in place"): ``S`` slots per row; :meth:`~ResidentSlots.plan` takes the units a step wants
  (plus optional *prefetch* units — the next step's likely ones, loaded but not attended) and says which
  are already resident (hits) and which slot each miss goes to. Only misses are fetched, so the bytes moved
  per step are ``misses × unit bytes``.

Everything is vectorised over rows and units (no Python loop per row, head or token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ShapeError

__all__ = ["MissPlan", "ResidentSlots", "TieredKVStore", "cold_bytes_per_step"]


def _cold_device(hot: torch.device) -> torch.device:
    return torch.device("cpu")


@dataclass
class TieredKVStore:
    """Cold arrays of units plus per-step byte accounting (see the module docstring).

    Parameters
    ----------
    hot:
        The compute device (where fetched units land).
    pin:
        Pin the cold tier (page-locked host memory) so host→device copies can be asynchronous. ``None``:
        pin when ``hot`` is a CUDA device.
    """

    hot: torch.device
    pin: bool | None = None
    cold: dict[str, torch.Tensor] = field(default_factory=dict)
    bytes_moved: int = 0  # decode-time copies cold → hot, all steps
    bytes_offloaded: int = 0  # prefill-time copies into the cold tier
    step_bytes: list[int] = field(default_factory=list)  # bytes moved per step (begin_step opens one)

    def __post_init__(self) -> None:
        self.hot = torch.device(self.hot)
        if self.pin is None:
            self.pin = self.hot.type == "cuda"

    @property
    def cold_device(self) -> torch.device:
        return _cold_device(self.hot)

    # ------------------------------------------------------------------ cold tier
    def offload(self, name: str, units: torch.Tensor) -> None:
        """Write ``units [R, n_units, *unit]`` into the cold tier under ``name`` (a real copy)."""
        if units.dim() < 2:
            raise ShapeError(f"offload expects [rows, units, ...], got {tuple(units.shape)}")
        out = torch.empty(units.shape, dtype=units.dtype, device=self.cold_device, pin_memory=bool(self.pin))
        out.copy_(units)
        self.cold[name] = out
        self.bytes_offloaded += out.numel() * out.element_size()

    def cold_bytes(self) -> int:
        """Bytes held in the cold tier."""
        return sum(t.numel() * t.element_size() for t in self.cold.values())

    def unit_bytes(self, name: str) -> int:
        t = self.cold[name]
        return t[0, 0].numel() * t.element_size()

    # ------------------------------------------------------------------ transfers
    def begin_step(self) -> None:
        """Open a decode step: later fetches count towards it."""
        self.step_bytes.append(0)

    def fetch(self, name: str, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Copy the units ``cold[name][rows[i], units[i]]`` into the hot tier: ``[M, *unit]``.

        ``rows`` and ``units`` are 1-D int64 of the same length ``M`` (on any device). The bytes of the
        copied tensor are added to :attr:`bytes_moved` and to the open step.
        """
        src = self.cold[name]
        if rows.shape != units.shape or rows.dim() != 1:
            raise ShapeError(f"fetch wants 1-D rows and units of one length, got {rows.shape}, {units.shape}")
        flat = (rows.to(src.device) * src.shape[1] + units.to(src.device)).long()
        picked = src.flatten(0, 1).index_select(0, flat)  # the gather from the cold tier
        if self.pin and picked.device.type == "cpu":
            picked = picked.pin_memory()
        out = picked.to(self.hot, non_blocking=bool(self.pin))
        self._count(out.numel() * out.element_size())
        return out

    def fetch_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Copy ``cold[name][r, index[r, j]]`` for every row: ``index [R, K]`` → ``[R, K, *unit]``."""
        src = self.cold[name]
        r, k = index.shape
        rows = torch.arange(r, device=index.device).repeat_interleave(k)
        return self.fetch(name, rows, index.reshape(-1)).view(r, k, *src.shape[2:])

    def _count(self, nbytes: int) -> None:
        self.bytes_moved += nbytes
        if not self.step_bytes:
            self.step_bytes.append(0)
        self.step_bytes[-1] += nbytes


@dataclass
class MissPlan:
    """What :meth:`ResidentSlots.plan` decided for one step.

    ``slot_of [R, K]`` — the slot holding each wanted unit (``-1`` for invalid columns);
    ``miss_rows, miss_units, miss_slots`` — 1-D, the units to load (wanted and prefetched misses) and the
    slot each goes to; ``attend [R, S]`` — which slots hold a wanted unit this step.
    """

    slot_of: torch.Tensor
    miss_rows: torch.Tensor
    miss_units: torch.Tensor
    miss_slots: torch.Tensor
    attend: torch.Tensor

    @property
    def misses(self) -> int:
        return int(self.miss_rows.numel())


class ResidentSlots:
    """The hot tier's temporal cache: ``slots`` resident units per row, replaced only where needed.

    ``unit_ids [R, S]`` holds the unit in each slot (``-1`` = empty). :meth:`plan` keeps every resident
    unit that is still wanted (or prefetched) in place and gives each missing one a slot that holds an
    unwanted unit, lowest slot first, in the order the misses appear.
    """

    def __init__(self, rows: int, n_units: int, slots: int, device: torch.device):
        self.n_units = int(n_units)
        self.unit_ids = torch.full((rows, slots), -1, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return int(self.unit_ids.shape[1])

    def grow(self, slots: int) -> None:
        """Add empty slots up to ``slots`` (never shrinks)."""
        extra = slots - self.slots
        if extra > 0:
            pad = torch.full(
                (self.unit_ids.shape[0], extra), -1, dtype=torch.long, device=self.unit_ids.device
            )
            self.unit_ids = torch.cat([self.unit_ids, pad], dim=1)

    def plan(
        self, want: torch.Tensor, valid: torch.Tensor | None = None, prefetch: torch.Tensor | None = None
    ) -> MissPlan:
        """Place the units ``want [R, K]`` (unique per row among ``valid``) and ``prefetch [R, E]``.

        The slots grow to ``K + E`` if needed. Prefetched units that are also wanted count once.
        """
        r, k = want.shape
        dev = want.device
        if valid is None:
            valid = torch.ones_like(want, dtype=torch.bool)
        targets, tvalid = want, valid
        if prefetch is not None and prefetch.shape[1] > 0:
            targets = torch.cat([want, prefetch], dim=1)
            tvalid = torch.cat([valid, torch.ones_like(prefetch, dtype=torch.bool)], dim=1)
        self.grow(targets.shape[1])
        s = self.slots
        n = self.n_units
        rows = torch.arange(r, device=dev)[:, None]
        # unit -> slot map of what is resident now; and which units are wanted / targeted
        slot_map = torch.full((r, n + 1), -1, dtype=torch.long, device=dev)
        res = self.unit_ids
        res_idx = torch.where(res >= 0, res, torch.full_like(res, n))
        slot_map.scatter_(1, res_idx, torch.arange(s, device=dev).expand(r, s).clone())
        slot_map[:, n] = -1
        t_idx = torch.where(tvalid, targets, torch.full_like(targets, n))
        # a prefetched unit equal to a wanted one (or repeated) must be placed once: first occurrence wins
        first = _first_occurrence(t_idx, n)
        tvalid = tvalid & first
        t_idx = torch.where(tvalid, t_idx, torch.full_like(t_idx, n))
        in_target = torch.zeros(r, n + 1, dtype=torch.bool, device=dev)
        in_target.scatter_(1, t_idx, True)
        in_target[:, n] = False
        keep_slot = (res >= 0) & in_target.gather(1, res_idx)
        cur = slot_map.gather(1, t_idx)  # slot of each target if resident
        miss = tvalid & (cur < 0)
        # misses take the free slots (not kept), in ascending slot order
        free_order = torch.sort(keep_slot.to(torch.uint8), dim=1, stable=True).indices  # free slots first
        rank = torch.cumsum(miss.long(), dim=1) - 1
        new_slot = free_order.gather(1, rank.clamp_min(0))
        slot_of_t = torch.where(miss, new_slot, cur)
        mr, mc = miss.nonzero(as_tuple=True)
        miss_slots = slot_of_t[mr, mc]
        miss_units = targets[mr, mc]
        # update the resident table: freed slots empty, misses placed
        ids = torch.where(keep_slot, res, torch.full_like(res, -1))
        ids[mr, miss_slots] = miss_units
        self.unit_ids = ids
        slot_of = torch.where(valid & first[:, :k], slot_of_t[:, :k], torch.full_like(want, -1))
        wanted = torch.zeros(r, n + 1, dtype=torch.bool, device=dev)
        wanted.scatter_(1, torch.where(valid, want, torch.full_like(want, n)), True)
        wanted[:, n] = False
        attend = (ids >= 0) & wanted.gather(1, torch.where(ids >= 0, ids, torch.full_like(ids, n)))
        del rows
        return MissPlan(slot_of, mr, miss_units, miss_slots, attend)


def _first_occurrence(idx: torch.Tensor, sentinel: int) -> torch.Tensor:
    """``[R, K]`` bool: column ``j`` holds the first occurrence of its value in the row (sentinel: False)."""
    r, k = idx.shape
    order = torch.sort(idx, dim=1, stable=True)
    sv, si = order.values, order.indices
    first_sorted = torch.ones_like(sv, dtype=torch.bool)
    first_sorted[:, 1:] = sv[:, 1:] != sv[:, :-1]
    out = torch.zeros_like(first_sorted)
    out.scatter_(1, si, first_sorted)
    return out & (idx != sentinel)


def _stores(state: dict[str, Any]) -> list[TieredKVStore]:
    out = []
    for val in state.values():
        store = val if isinstance(val, TieredKVStore) else getattr(val, "store", None)
        if isinstance(store, TieredKVStore):
            out.append(store)
    return out


def cold_bytes_per_step(states: list[dict[str, Any]]) -> float:
    """Bytes moved from the cold tier per decode step, summed over layers.

    Finds every :class:`TieredKVStore` in the per-layer method states (a value that is a store or has a
    ``store`` attribute, as ShadowKV's and A²ATS's layer states do). A step is one token per sequence;
    divide by the batch for bytes per token. ``0.0`` before the first step or without stores.
    """
    total, steps = 0, 0
    for st in states:
        for store in _stores(st):
            total += store.bytes_moved
            steps = max(steps, len(store.step_bytes))
    return total / steps if steps else 0.0
