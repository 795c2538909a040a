"""The interface of a KV storage format (what the engine and the methods may call on a layer cache).

A storage format replaces a layer's :class:`~mpckv.plaintext.kv_cache.LayerCache` through
``ctx.replace_cache(new)``. It keeps the *logical* layout of the dense cache: per (sequence, KV head) row
``lengths[b, hk]`` live entries, each with a position, and ``keys()`` / ``values()`` / ``positions()`` /
``valid()`` over ``[B, Hk, max_length]`` (``keys()`` / ``values()`` dequantize or re-expand: a reference
path, not the fast one). A format that defines ``attend`` gets decode attention routed to it by the engine
and never materialises the full-precision cache.

Byte accounting: ``nbytes()`` is every byte the format holds (allocated capacity included, exactly the
sum of its tensors' ``numel * element_size``); ``live_bytes()`` the bytes of the live entries only.
``element_bytes`` is the element size of the *model* dtype (the engine derives the dense reference from
it), not of the stored codes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class FormatCache(Protocol):
    """What a storage format provides (structural: subclassing is not required).

    Attributes
    ----------
    batch, kv_heads, head_dim, dtype, device:
        As in :class:`~mpckv.plaintext.kv_cache.LayerCache`.
    lengths:
        ``[B, Hk]`` live entries per row (a tensor, possibly computed).
    meta:
        Per-entry metadata ``[B, Hk, cap]`` that moves with compaction (a format may restrict it to part of
        its entries and must say so).
    version:
        Bumped whenever entries move (derived structures must be rebuilt).
    """

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    meta: dict[str, torch.Tensor]
    version: int

    @property
    def lengths(self) -> torch.Tensor: ...

    @property
    def max_length(self) -> int: ...

    @property
    def element_bytes(self) -> int: ...

    def keys(self) -> torch.Tensor:
        """``[B, Hk, max_length, d]`` in the model dtype (dequantized reference)."""
        ...

    def values(self) -> torch.Tensor: ...

    def positions(self) -> torch.Tensor:
        """``[B, Hk, max_length]`` original token positions (long)."""
        ...

    def valid(self) -> torch.Tensor: ...

    def nbytes(self) -> int: ...

    def live_bytes(self) -> int: ...

    def add_meta(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> torch.Tensor: ...

    def append(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Append ``[B, Hk, T, d]`` new entries (positions ``[B, T]``) as :meth:`LayerCache.append`."""
        ...

    def compact(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep the entries at ``index [B, Hk, K]`` of the logical layout (valid columns first)."""
        ...


@runtime_checkable
class AttendingCache(FormatCache, Protocol):
    """A format with its own decode attention (the engine calls it instead of reading K/V)."""

    def attend(
        self,
        q: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        need_probs: bool,
        index: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q [B, H, d]`` → ``out [B, H, d]`` and, when ``need_probs``, fp32 ``probs [B, H, L]`` over the
        logical layout (over the selected rows ``index [B, Hk, K]`` / ``counts [B, Hk]`` when given).
        ``keep [B, Hk, L]`` (or ``[B, Hk, K]`` with a selection) restricts the attended entries."""
        ...
