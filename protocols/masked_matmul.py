"""Products with a secret operand whose mask is persistent: ``x · f(M)`` for ``M = E + B``.

Stock CrypTen multiplies two secrets with a fresh Beaver triple ``(a, b, a·b)``: it opens ``x − a`` *and*
``y − b``. When ``y`` is the KV cache, ``y − b`` is the whole cache, ``O(n·d)`` per head and step
(``shared/research/mpc_anchors.md``, finding 1). Here the cache operand ``M`` (K or V, ``[B, Hk, L, d]``)
was opened **once**, row by row when it was appended, as ``E = M − B`` with a uniformly random ring mask
``B`` that stays secret-shared (:mod:`mpckv.protocols.persistent_cache`). A product then needs a triple
``(a_t, c_t = a_t · f(B))`` with a *fresh* ``a_t`` and the *persistent* ``B``:

1. open ``ε = x − a_t`` (the size of ``x``: ``O(d)`` for ``q·Kᵀ``, ``O(n)`` for ``p·V``);
2. each party computes ``z_i = x_i · f(E) + ε · f(B_i) + c_i`` locally (``f(E)`` is public);
3. ``Σ z_i = x·f(E) + (x − a_t)·f(B) + a_t·f(B) = x · f(M)`` at scale ``s²``; one truncation by ``s``
   (CrypTen's :meth:`ArithmeticSharedTensor.div_`: local in 2PC, its wraps / RSS protocol for 3 parties)
   brings it back to scale ``s``, exactly as CrypTen's own ``matmul`` does.

``f`` is a public, linear layout map, applied alike to ``E``, to every share of ``B`` and, by the
dealer, to ``B`` itself (``f(E + B) = f(E) + f(B)`` in the ring): ``"T"`` transposes (``q·Kᵀ``), ``"N"``
keeps it (``p·V``), ``"C"`` pads ``L`` to ``C·s`` with zero rows and views it as ``[C, s·d]`` clusters (the
one-hot gather of MPCache: ``e [k, C] · K̃ [C, s·d]``).

Who knows ``B`` (the *dealer*) depends on CrypTen's provider:

* **TFP** (:class:`FirstPartyMasks`) — party 0 draws ``B``, ``a_t`` and ``c_t`` in plaintext and shares them
  by pseudo-random zero sharing (``src=0``, no traffic), like CrypTen's ``TrustedFirstParty``. Insecure
  against party 0: measurement only.
* **TTP** (:class:`DealerMasks`) — the dealer process. Every party ``i`` shares a seed with the dealer
  (CrypTen's TTP generators); per cache it derives a generator from it, draws its share of ``B``, of
  ``a_t`` and (``i ≥ 1``) of ``c_t`` from it, and the dealer, who can draw every share, sends party 0 the
  correction ``c_0 = a_t·f(B) − Σ_{i≥1} c_i``. Appends and compactions are queued and travel with the
  next triple request (request ``"pm_triple"``), so a decode step costs one dealer round trip per product;
  all of it is offline traffic. The dealer side is :func:`install_dealer`.

Everything this module opens goes through :func:`open_masked`, which records it
(:func:`recording_openings`); the audit test checks that nothing else crosses the wire.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten

__all__ = [
    "DEALER_FUNCTIONS",
    "DealerMasks",
    "FirstPartyMasks",
    "MaskStore",
    "Opening",
    "Spec",
    "c_shape",
    "install_dealer",
    "layout",
    "mask_source",
    "masked_product",
    "open_masked",
    "recording_openings",
]

#: A product spec ``(which, layout, cluster_size)``: ``which`` is ``"k"`` or ``"v"``; ``layout`` is
#: ``"T"`` (``x · Mᵀ``), ``"N"`` (``x · M``) or ``"C"`` (``x · M̃``, clusters of ``cluster_size`` rows).
Spec = tuple[str, str, int]

#: Requests the dealer must serve (add them to the dealer loop's allow-list).
DEALER_FUNCTIONS = ("pm_triple", "pm_release")


# ------------------------------------------------------------------------------------- openings
@dataclass(frozen=True)
class Opening:
    """One masked value opened to every party."""

    what: str
    shape: tuple[int, ...]
    labels: str
    value: torch.Tensor | None = field(default=None, compare=False, repr=False)


_OPENINGS: list[Opening] | None = None
_KEEP_VALUES = False


@contextlib.contextmanager
def recording_openings(values: bool = False) -> Iterator[list[Opening]]:
    """Record every :func:`open_masked` made inside the block (on this party); with ``values=True``
    also the opened ring tensors (for tests of mask freshness)."""
    global _OPENINGS, _KEEP_VALUES
    previous, _OPENINGS = _OPENINGS, []
    keep, _KEEP_VALUES = _KEEP_VALUES, values
    log = _OPENINGS
    try:
        yield log
    finally:
        _OPENINGS, _KEEP_VALUES = previous, keep


def _labels() -> str:
    state = comm._STATE
    return "/".join(stack[-1] if stack else comm.UNLABELLED for stack in (state.phases, state.ops))


def open_masked(shares: Sequence[torch.Tensor], what: Sequence[str]) -> list[torch.Tensor]:
    """Open masked ring values to every party, in one round (a batched all-reduce of the shares).

    Only values masked by a uniformly random ring element that masks nothing else may be passed here:
    ``K − B`` rows once, ``x − a_t`` with a fresh ``a_t``.
    """
    crypten = import_crypten()
    opened = list(crypten.communicator.get().all_reduce([s.contiguous() for s in shares], batched=True))
    if _OPENINGS is not None:
        labels = _labels()
        for value, w in zip(opened, what, strict=True):
            _OPENINGS.append(Opening(w, tuple(value.shape), labels, value.clone() if _KEEP_VALUES else None))
    return opened


# --------------------------------------------------------------------------------------- layouts
def layout(m: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The public linear map ``f`` of ``spec`` applied to ``m [B, Hk, L, d]`` (a ring tensor)."""
    _, lay, s = spec
    if lay == "T":
        return m.transpose(-1, -2)
    if lay == "N":
        return m
    if lay == "C":
        b, hk, n, d = m.shape
        c = -(-n // s)
        if c * s != n:
            m = torch.cat([m, m.new_zeros(b, hk, c * s - n, d)], dim=2)
        return m.reshape(b, hk, c, s * d)
    raise ConfigError(f"unknown layout {lay!r}")


def c_shape(spec: Spec, a_shape: Sequence[int], mask_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of ``a · f(B)`` for ``a [B, Hk, R, X]`` and ``B`` of ``mask_shape [B, Hk, L, d]``."""
    b, hk, n, d = mask_shape
    _, lay, s = spec
    cols = {"T": n, "N": d, "C": s * d}[lay]
    return (*tuple(a_shape[:-1]), cols)


def _ring(shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    from crypten.common.rng import generate_random_ring_element

    return generate_random_ring_element(tuple(shape), generator=generator)


# ------------------------------------------------------------------------------------ mask store
class MaskStore:
    """The dealer's plaintext masks ``B_k, B_v [B, Hk, L, d]`` of one cache (TFP party 0 or TTP dealer)."""

    def __init__(self) -> None:
        self.bk: torch.Tensor | None = None
        self.bv: torch.Tensor | None = None

    def append(self, bk: torch.Tensor, bv: torch.Tensor) -> None:
        self.bk = bk if self.bk is None else torch.cat([self.bk, bk], dim=2)
        self.bv = bv if self.bv is None else torch.cat([self.bv, bv], dim=2)

    def compact(self, index: torch.Tensor) -> None:
        if self.bk is None or self.bv is None:
            raise ShapeError("compaction of an empty persistent cache")
        gidx = index[..., None].expand(*index.shape, self.bk.shape[-1])
        self.bk, self.bv = self.bk.gather(2, gidx), self.bv.gather(2, gidx)

    def product(self, spec: Spec, a: torch.Tensor) -> torch.Tensor:
        """``a · f(B)`` in the ring."""
        mask = self.bk if spec[0] == "k" else self.bv
        if mask is None:
            raise ShapeError("product with an empty persistent cache")
        return a.matmul(layout(mask, spec))


# ------------------------------------------------------------------------------- party-side masks
def _rank() -> int:
    return int(import_crypten().communicator.get().get_rank())


def _przs(shape: Sequence[int]) -> torch.Tensor:
    from crypten.mpc.primitives import ArithmeticSharedTensor

    return ArithmeticSharedTensor.PRZS(tuple(shape)).share


class FirstPartyMasks:
    """TFP: party 0 is the dealer (plaintext masks on party 0, zero-communication sharing)."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.store = MaskStore() if _rank() == 0 else None

    def _share(self, value: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
        share = _przs(shape)
        if value is not None:
            share += value
        return share

    def rows(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This party's shares of fresh masks ``(B_k, B_v)`` for appended rows of ``shape``."""
        bk = bv = None
        if self.store is not None:
            bk, bv = _ring(shape), _ring(shape)
            self.store.append(bk, bv)
        return self._share(bk, shape), self._share(bv, shape)

    def compact(self, index: torch.Tensor) -> None:
        if self.store is not None:
            self.store.compact(index)

    def triple(
        self, spec: Spec, a_shape: Sequence[int], cshape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This party's shares of ``(a_t, a_t · f(B))`` with a fresh ``a_t``."""
        a = c = None
        if self.store is not None:
            a = _ring(a_shape)
            c = self.store.product(spec, a)
        return self._share(a, a_shape), self._share(c, cshape)

    def close(self) -> None:
        self.store = None


def _derived_generator(seed: int, key: int) -> torch.Generator:
    """A generator for cache ``key`` from a seed a party shares with the dealer (a hash as the PRF)."""
    digest = hashlib.sha256(f"mpckv-persistent-mask:{seed}:{key}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return g


class DealerMasks:
    """TTP: a dealer process knows ``B``; see the module docstring for the protocol."""

    def __init__(self, key: int) -> None:
        from crypten.mpc.provider.ttp_provider import TTPClient

        self.key = key
        self.rank = _rank()
        self.gen = _derived_generator(TTPClient.get().get_generator().initial_seed(), key)
        self.events: list[tuple[Any, ...]] = []

    def rows(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        bk, bv = _ring(shape, self.gen), _ring(shape, self.gen)
        self.events.append(("append", tuple(shape)))
        return bk, bv

    def compact(self, index: torch.Tensor) -> None:
        self.events.append(("compact", index.clone()))

    def triple(
        self, spec: Spec, a_shape: Sequence[int], cshape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from crypten.mpc.provider.ttp_provider import TTPClient

        a = _ring(a_shape, self.gen)
        events, self.events = self.events, []
        if self.rank == 0:
            c = TTPClient.get().ttp_request("pm_triple", None, self.key, events, spec, tuple(a_shape))
        else:
            c = _ring(cshape, self.gen)
        if tuple(c.shape) != tuple(cshape):
            raise ShapeError(f"dealer sent {tuple(c.shape)}, expected {tuple(cshape)}")
        return a, c

    def close(self) -> None:
        from crypten.mpc.provider.ttp_provider import TTPClient

        self.events = []
        if self.rank == 0:
            TTPClient.get().ttp_request("pm_release", None, self.key)


def mask_source(key: int) -> FirstPartyMasks | DealerMasks:
    """The mask dealer of CrypTen's configured provider (``TFP`` or ``TTP``)."""
    provider = str(import_crypten().cfg.mpc.provider)
    if provider == "TFP":
        return FirstPartyMasks(key)
    if provider == "TTP":
        return DealerMasks(key)
    raise ConfigError(f"the persistent-mask cache supports the TFP and TTP providers, not {provider!r}")


# ----------------------------------------------------------------------------------- the product
def masked_product(
    x: Any,
    public: torch.Tensor,
    mask_share: torch.Tensor,
    spec: Spec,
    source: FirstPartyMasks | DealerMasks,
    mask_shape: Sequence[int],
    scale: int,
) -> Any:
    """Secret ``x [B, Hk, R, X]`` times the secret ``f(M) = f(E) + f(B)`` (see the module docstring).

    ``public`` is ``f(E)``, ``mask_share`` this party's ``f(B_i)``, both ``[B, Hk, X, Y]`` ring tensors;
    ``scale`` the fixed-point scale of ``M``. Returns a secret ``[B, Hk, R, Y]`` at ``M``'s scale, like
    CrypTen's ``matmul``: truncated once by ``x``'s scale when both are fixed point, not at all when ``x``
    is an integer tensor (scale 1: comparison results, CrypTen's one-hot ``argmax``). Online traffic: one
    opening of ``x``'s size, plus CrypTen's truncation (none in 2PC).
    """
    crypten = import_crypten()
    from crypten.mpc.primitives import ArithmeticSharedTensor

    sx, sm = int(x.encoder.scale), int(scale)
    a, c = source.triple(spec, tuple(x.shape), c_shape(spec, tuple(x.shape), mask_shape))
    (eps,) = open_masked([x.share - a], ["operand"])
    z = x.share.matmul(public) + eps.matmul(mask_share) + c  # x · f(M) at scale sx · sm
    precision = (sm if sm > 1 else sx).bit_length() - 1
    out = ArithmeticSharedTensor.from_shares(z, precision=precision)
    if sx > 1 and sm > 1:
        out.div_(sx)  # one truncation, CrypTen's protocol for the configuration
    return crypten.mpc.MPCTensor.from_shares(out.share, precision=precision)


# ------------------------------------------------------------------------------------ dealer side
def _dealer_state(server: Any, key: int) -> dict[str, Any]:
    states = server.__dict__.setdefault("_mpckv_persistent_masks", {})
    if key not in states:
        gens = [_derived_generator(g.initial_seed(), key) for g in server.generators]
        states[key] = {"gens": gens, "store": MaskStore()}
    return states[key]


def _pm_triple(
    server: Any, key: int, events: list[tuple[Any, ...]], spec: Spec, a_shape: tuple[int, ...]
) -> torch.Tensor:
    """Dealer: replay the queued appends/compactions of cache ``key``, return party 0's ``c_0``."""
    state = _dealer_state(server, key)
    gens, store = state["gens"], state["store"]
    for event in events:
        if event[0] == "append":
            draws = [(_ring(event[1], g), _ring(event[1], g)) for g in gens]  # per party: B_k then B_v
            store.append(sum(d[0] for d in draws), sum(d[1] for d in draws))
        elif event[0] == "compact":
            store.compact(event[1])
        else:
            raise ConfigError(f"unknown persistent-mask event {event[0]!r}")
    a = sum(_ring(a_shape, g) for g in gens)  # per party: a_i first ...
    c = store.product(spec, torch.as_tensor(a))
    others = [_ring(c.shape, g) for g in gens[1:]]  # ... then c_i (i >= 1)
    return c - sum(others) if others else c


def _pm_release(server: Any, key: int) -> torch.Tensor:
    """Dealer: forget cache ``key``'s masks."""
    server.__dict__.setdefault("_mpckv_persistent_masks", {}).pop(key, None)
    return torch.zeros(1, dtype=torch.long)


def install_dealer() -> None:
    """Add the ``pm_*`` request handlers to CrypTen's ``TTPServer`` (idempotent).

    Must run in the dealer process before the first request: CrypTen's ``TTPServer`` loop dispatches
    with ``getattr(server, message["function"])``; mpckv's own dealer loop also needs
    :data:`DEALER_FUNCTIONS` in its allow-list.
    """
    import_crypten()
    from crypten.mpc.provider.ttp_provider import TTPServer

    for name, fn in (("pm_triple", _pm_triple), ("pm_release", _pm_release)):
        if getattr(TTPServer, name, None) is not fn:
            setattr(TTPServer, name, fn)
