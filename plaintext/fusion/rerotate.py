"""RoPE re-rotation of canonical chunk caches, and the start-up self-check that guards fusion.

A stored chunk's keys are post-RoPE at positions ``0..n-1``. Placing the chunk at offset ``o`` needs keys at
``o..o+n-1``; since RoPE rotations compose (``R(a)·R(b) = R(a+b)`` for every frequency pair), that is one
rotation by ``o`` of the canonical keys (Su et al., RoFormer, arXiv 2104.09864; the delta form is LMCache's
``old_pos → new_pos`` fused rotation used by CacheBlend). Values are position-free.

Always rotate from the canonical form, never a rotated copy: chained low-precision rotations drift. The
rotation itself is computed in fp32 and cast back to the cache dtype once.

Which RoPE variants compose: frequency-only scalings whose frequencies do not depend on the sequence
length — ``default``, ``linear`` (position interpolation) and ``llama3`` (per-band rescaling). Length
dependent variants (dynamic NTK, YaRN/LongRoPE with length switches or magnitude factors) are refused by
:func:`check_rotatable` with a :class:`RotationError`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.errors import ConfigError, MpckvError
from mpckv.plaintext.rope import rerotate

COMPOSABLE_ROPE = frozenset({"default", "linear", "llama3"})
log = logging.getLogger("mpckv.fusion")


class RotationError(ConfigError):
    """The model's RoPE cannot be re-rotated exactly (length-dependent frequencies)."""


class FusionDisabled(MpckvError):
    """The start-up rotation self-check failed: fused caches would be wrong for this model."""


def check_rotatable(rope: Any) -> None:
    """Raise :class:`RotationError` unless ``rope.rope_type`` composes under a position shift."""
    kind = getattr(rope, "rope_type", "default")
    if kind not in COMPOSABLE_ROPE:
        raise RotationError(
            f"RoPE type {kind!r} has length-dependent frequencies and cannot be re-rotated; "
            f"KV fusion supports {sorted(COMPOSABLE_ROPE)} (use full prefill for this model)"
        )


def rotate_chunk(keys: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Canonical keys ``[..., n, d]`` (positions ``0..n-1``) → keys at positions ``offset..offset+n-1``."""
    if offset == 0:
        return keys
    delta = torch.full((keys.shape[-2],), int(offset), dtype=torch.long, device=keys.device)
    return rerotate(keys, delta, inv_freq.to(keys.device))


@dataclass
class RotationCheck:
    """Outcome of :func:`rotation_self_check`: the worst relative error over the tested offsets."""

    max_error: float
    tolerance: float
    offsets: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed by the self-check: fp32 angles lose ~1e-3 at positions in the thousands."""
    return 5e-3 if dtype in (torch.float32, torch.float64) else 6e-2


@torch.no_grad()
def rotation_self_check(model: Any, n: int = 16, seed: int = 0) -> RotationCheck:
    """Compare, on layer 0 of ``model``, keys computed at offset ``δ`` with canonical keys rotated by ``δ``.

    Uses the model's own projection and RoPE path (``model.qkv``), so a checkpoint whose RoPE differs from
    what :func:`rotate_chunk` assumes fails here. Offsets: 1, 37, 1000 and near the maximum position.
    """
    check_rotatable(model.config.rope)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(model.device)
    hidden = model.embed(ids)
    top = max(2, cfg.max_position_embeddings - n)
    offsets = tuple(sorted({o for o in (1, 37, 1000, top) if o <= top}))
    base = torch.arange(n, device=model.device)[None]
    _, k0, _ = model.qkv(0, hidden, base)
    worst = 0.0
    for off in offsets:
        _, k_direct, _ = model.qkv(0, hidden, base + off)
        k_rot = rotate_chunk(k0, off, model.inv_freq)
        err = (k_rot.float() - k_direct.float()).abs().max() / k_direct.float().abs().max().clamp_min(1e-12)
        worst = max(worst, float(err))
    return RotationCheck(worst, default_tolerance(model.dtype), offsets)


def ensure_fusion_ok(model: Any, strict: bool = False) -> RotationCheck:
    """Run the self-check once per model (cached on it); warn loudly, or raise when ``strict``."""
    cached = getattr(model, "_mpckv_rotation_check", None)
    if isinstance(cached, RotationCheck):
        check = cached
    else:
        check = rotation_self_check(model)
        model._mpckv_rotation_check = check
        if not check.ok:
            msg = (
                f"KV fusion disabled for this model: RoPE re-rotation error {check.max_error:.3g} exceeds "
                f"{check.tolerance:.3g}; prefill_segments falls back to full prefill"
            )
            log.error(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if strict and not check.ok:
        raise FusionDisabled(
            f"RoPE re-rotation self-check failed (error {check.max_error:.3g} > {check.tolerance:.3g})"
        )
    return check
