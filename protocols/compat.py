"""Every fix mpckv needs to run CrypTen 0.4.1 on current torch, in one place.

CrypTen is unmaintained (last release 0.4.1, Dec 2022). :func:`import_crypten` returns the ``crypten``
module after applying each fix below exactly once; every other module of mpckv imports CrypTen through it,
never with a bare ``import crypten``. Each fix is tested in ``tests/protocols/test_compat.py``.

Install (not a runtime fix)
    ``pip install crypten`` fails because its requirements name the dead ``sklearn`` PyPI package
    (CrypTen issues #454, #466, #499, #512). The Makefile installs it with ``pip install --no-deps
    crypten==0.4.1`` and adds what it really imports through the ``mpc`` extra (omegaconf, onnx, pyyaml).

Fix 1 — ONNX registry import (:func:`_alias_onnx_modules`)
    ``crypten/nn/onnx_converter.py`` runs ``from torch.onnx._internal.registration import registry`` at
    import time. Torch moved that module to ``torch.onnx._internal.torchscript_exporter.registration``, so
    ``import crypten`` raises ``ModuleNotFoundError``. We register the module found under the old name in
    ``sys.modules`` before the import (the same for ``torch.onnx.symbolic_helper`` should it move). If no
    candidate exists at all, a stub whose ``registry`` is ``None`` is registered: mpckv never calls
    ``crypten.nn.from_pytorch``, the only user of the registry.

Fix 2 — exact fixed-point decode (:func:`exact_decode`)
    ``FixedPointEncoder.decode`` floor-divides negative integers by ``scale - 1`` instead of ``scale``.
    Every value ``x = -m + f`` with ``m >= 1`` and ``0 < f*2**16 < m`` decodes one too low, e.g.
    ``-2 + 2**-16 -> -2.99998`` and ``-100 + 2**-10 -> -100.999``; it also casts to float32, which drops
    integer bits above 2**24 (issue #57). The replacement floor-divides by ``2**p``, keeps the remainder
    and returns ``q.double() + r.double() / 2**p``: exact for every ring element with ``|x| < 2**37``
    (53 mantissa bits), and **float64** (cast with ``.float()`` to compare with float32 references).

Fix 3 — contiguous shares for communication (:func:`contiguous_`, :func:`_patch_contiguous_comm`)
    gloo refuses non-contiguous buffers ("input tensor has to be contiguous"). Stock CrypTen hands it
    views: ``replicated.replicate_shares`` receives into ``torch.zeros_like(share)``, which keeps the
    strides of a transposed share, so 3-party ``replicated`` mul/matmul on e.g. ``k.transpose(-1, -2)``
    crashes. We patch ``replicate_shares`` to work on contiguous copies, and wrap the point-to-point and
    collective methods of ``DistributedCommunicator`` (send, recv, isend, gather, all_gather, reduce,
    all_reduce, broadcast) so they pass contiguous tensors to gloo. The wrappers call the original
    (logging-decorated) methods, so communication accounting is unchanged. :func:`contiguous_` is the
    manual form: ``x.share = x.share.contiguous()``.

Fix 5 — 2-party equality on integer (scale-1) tensors (:func:`_patch_eq_2pc`)
    ``MPCTensor._eqz_2PC`` converts the equality bit back to arithmetic shares with the default precision
    and then sets the encoder scale to 1. For a fixed-point input the two cancel; for a scale-1 input
    (comparison bits, ranks, indices) the bit comes back multiplied by ``2**16`` (``eq`` returns 65536
    for true). The patch converts with ``precision=0`` for scale-1 inputs, as ``_ltz`` already does.

Fix 6 — warning noise (:func:`import_crypten`)
    Every torch function applied to a CrypTensor makes torch warn that ``CrypTensor.__torch_function__``
    should be a classmethod; the warning is filtered (it is about CrypTen's code, not the caller's).

Fix 4 — bounded collectives (:func:`set_collective_timeout`)
    ``DistributedCommunicator`` calls ``dist.init_process_group`` and ``dist.new_group`` without a
    timeout, so a dead peer blocks the others for torch's default 30 minutes. ``set_collective_timeout``
    wraps both functions (in ``torch.distributed``) so that every group CrypTen creates gets the given
    timeout; gloo applies it to each send, recv and collective. Call it before ``crypten.init()``.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import sys
import threading
import types
import warnings
from typing import Any

import torch

__all__ = [
    "import_crypten",
    "exact_decode",
    "stock_decode",
    "stock",
    "contiguous_",
    "set_collective_timeout",
    "collective_timeout",
    "applied_fixes",
]

_LOCK = threading.RLock()
_APPLIED: list[str] = []
_CRYPTEN: Any = None
_STOCK_DECODE: Any = None
_STOCK: dict[str, Any] = {}
_TIMEOUT: datetime.timedelta | None = None

# Where torch has kept (or moved) the modules crypten imports by their old names.
_ONNX_ALIASES: dict[str, tuple[str, ...]] = {
    "torch.onnx._internal.registration": (
        "torch.onnx._internal.registration",
        "torch.onnx._internal.torchscript_exporter.registration",
    ),
    "torch.onnx.symbolic_helper": (
        "torch.onnx.symbolic_helper",
        "torch.onnx._internal.torchscript_exporter.symbolic_helper",
    ),
}


def _try_import(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _alias_onnx_modules() -> None:
    """Fix 1: make the ONNX modules crypten imports at import time resolvable under their old names."""
    for old, candidates in _ONNX_ALIASES.items():
        if old in sys.modules:
            continue
        module = None
        for cand in candidates:
            module = _try_import(cand)
            if module is not None:
                break
        if module is None:
            module = types.ModuleType(old)
            module.registry = None  # type: ignore[attr-defined]
        sys.modules[old] = module


def exact_decode(self: Any, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Fix 2: exact replacement of ``crypten.encoder.FixedPointEncoder.decode``.

    ``tensor`` holds ring integers ``x * 2**p``. Returns float64 ``floor(t / 2**p) + (t mod 2**p) / 2**p``
    for ``scale > 1`` (exact while ``|x| < 2**37``) and the integers unchanged for ``scale == 1`` (CrypTen
    uses scale 1 for comparison bits; the stock decoder also returns them as integers).
    """
    if tensor is None:
        return None
    data = tensor.data if hasattr(tensor, "data") else tensor
    if not isinstance(data, torch.Tensor) or data.dtype not in (torch.int64, torch.int32, torch.int16):
        raise TypeError(f"decode expects an integer tensor, got {type(tensor).__name__}")
    scale = int(self._scale)
    if scale == 1:
        return data
    q = torch.div(data, scale, rounding_mode="floor")
    r = data - q * scale
    return q.double() + r.double() / scale


def stock_decode(encoder: Any, tensor: torch.Tensor) -> torch.Tensor:
    """The original (buggy) CrypTen decode, kept for tests that show the bug is real."""
    import_crypten()
    return _STOCK_DECODE(encoder, tensor)


def stock(name: str) -> Any:
    """The original CrypTen function a fix replaced: ``"decode"``, ``"replicate_shares"``, ``"eqz_2pc"``.

    For tests that show a bug is real; never call these in library code.
    """
    import_crypten()
    return _STOCK[name]


def contiguous_(x: Any) -> Any:
    """Make the share of a CrypTensor contiguous in place (``x.share = x.share.contiguous()``); returns x.

    The patched communicator already does this where CrypTen talks to gloo; call it by hand only for
    code that passes shares to ``torch.distributed`` directly.
    """
    share = x.share
    if isinstance(share, torch.Tensor) and not share.is_contiguous():
        x.share = share.contiguous()
    return x


def _contig(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and not t.is_contiguous():
        return t.contiguous()
    if isinstance(t, list):
        return [_contig(u) for u in t]
    return t


def _patch_contiguous_comm(crypten: Any) -> None:
    """Fix 3: contiguous buffers for every gloo call CrypTen makes."""
    from crypten.communicator import distributed_communicator as dc
    from crypten.mpc.primitives import replicated

    comm_cls = dc.DistributedCommunicator

    def wrap_inputs(name: str) -> None:
        orig = getattr(comm_cls, name)

        @functools.wraps(orig)
        def method(self: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
            return orig(self, _contig(tensor), *args, **kwargs)

        setattr(comm_cls, name, method)

    for name in ("send", "recv", "isend", "gather", "all_gather", "reduce", "all_reduce"):
        wrap_inputs(name)

    orig_broadcast = comm_cls.broadcast

    @functools.wraps(orig_broadcast)
    def broadcast(self: Any, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        # broadcast writes into ``input``: receive into contiguous buffers, then copy back.
        items = input if batched else [input]
        bufs = [_contig(t) for t in items]
        orig_broadcast(self, bufs if batched else bufs[0], src, group=group, batched=batched)
        for t, b in zip(items, bufs, strict=True):
            if b is not t:
                t.copy_(b)
        return input

    comm_cls.broadcast = broadcast

    def replicate_shares(share_list: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``replicated.replicate_shares`` on contiguous shares (stock receives into strided views)."""
        comm = crypten.communicator.get()
        world_size = comm.get_world_size()
        if world_size < 3:
            raise ValueError("Cannot utilize Replicated Sharing securely with < 3 parties.")
        rank = comm.get_rank()
        prev_rank = (rank - 1) % world_size
        next_rank = (rank + 1) % world_size
        shares = [s.contiguous() for s in share_list]
        received = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in shares]
        reqs = []
        for share, buf in zip(shares, received, strict=True):
            reqs.append(comm.isend(share, dst=next_rank))
            reqs.append(comm.irecv(buf, src=prev_rank))
        for req in reqs:
            req.wait()
        return list(zip(shares, received, strict=True))

    _STOCK.setdefault("replicate_shares", replicated.replicate_shares)
    replicated.replicate_shares = replicate_shares


def _patch_eq_2pc(crypten: Any) -> None:
    """Fix 5: ``_eqz_2PC`` returns 0/1 (not 0/2**16) for scale-1 inputs."""
    from crypten.mpc.mpc import MPCTensor
    from crypten.mpc.ptype import ptype as Ptype

    def _eqz_2PC(self: Any) -> Any:
        x0 = MPCTensor(self.share, src=0, ptype=Ptype.binary)
        x1 = MPCTensor(-self.share, src=1, ptype=Ptype.binary)
        x0._tensor = x0._tensor.eq(x1._tensor)
        x0.encoder = self.encoder
        precision = 0 if self.encoder.scale == 1 else None
        result = x0.to(Ptype.arithmetic, bits=1, precision=precision)
        result.encoder._scale = 1
        return result

    _STOCK.setdefault("eqz_2pc", MPCTensor._eqz_2PC)
    MPCTensor._eqz_2PC = _eqz_2PC


def _patch_decode(crypten: Any) -> None:
    global _STOCK_DECODE
    from crypten.encoder import FixedPointEncoder

    if _STOCK_DECODE is None:
        _STOCK_DECODE = FixedPointEncoder.decode
        _STOCK["decode"] = _STOCK_DECODE
    FixedPointEncoder.decode = exact_decode


def set_collective_timeout(seconds: float | None) -> None:
    """Fix 4: give every process group created from now on a timeout of ``seconds`` (None: torch default).

    Wraps ``torch.distributed.init_process_group`` and ``torch.distributed.new_group`` once; later calls
    only change the value. An explicit ``timeout=`` argument still wins.
    """
    global _TIMEOUT
    import torch.distributed as dist

    with _LOCK:
        _TIMEOUT = None if seconds is None else datetime.timedelta(seconds=float(seconds))
        if getattr(dist.init_process_group, "_mpckv_timeout", False):
            return
        for name in ("init_process_group", "new_group"):
            orig = getattr(dist, name)

            def make(orig: Any) -> Any:
                @functools.wraps(orig)
                def with_timeout(*args: Any, **kwargs: Any) -> Any:
                    if kwargs.get("timeout") is None and _TIMEOUT is not None:
                        kwargs["timeout"] = _TIMEOUT
                    return orig(*args, **kwargs)

                with_timeout._mpckv_timeout = True  # type: ignore[attr-defined]
                return with_timeout

            setattr(dist, name, make(orig))


def collective_timeout() -> datetime.timedelta | None:
    """The timeout :func:`set_collective_timeout` installed, or None."""
    return _TIMEOUT


def applied_fixes() -> list[str]:
    """Names of the fixes applied so far, in order (for diagnostics and tests)."""
    return list(_APPLIED)


def import_crypten() -> Any:
    """Import CrypTen with every fix of this module applied (idempotent, thread-safe); return the module."""
    global _CRYPTEN
    with _LOCK:
        if _CRYPTEN is not None:
            return _CRYPTEN
        _alias_onnx_modules()
        _APPLIED.append("onnx-registry-alias")
        warnings.filterwarnings(
            "ignore", message=r"Defining your `__torch_function__` as a plain method", category=UserWarning
        )
        import crypten

        _patch_decode(crypten)
        _APPLIED.append("exact-decode")
        _patch_contiguous_comm(crypten)
        _APPLIED.append("contiguous-comm")
        _patch_eq_2pc(crypten)
        _APPLIED.append("eq-2pc-scale1")
        _CRYPTEN = crypten
        return crypten
