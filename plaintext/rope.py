"""Rotary position embeddings (Su et al., RoFormer, arXiv 2104.09864) in the NeoX / HF ``rotate_half`` layout.

Scaling variants: ``default``, ``linear`` (position interpolation, Chen et al. arXiv 2306.15595) and
``llama3`` (Meta's frequency-band rescaling used by Llama 3.1+). Rotations compose, so a post-RoPE key
can be moved to another position by rotating it by the difference (:func:`rerotate`).
"""

from __future__ import annotations

import functools
import math

import torch

from mpckv.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies ``[head_dim // 2]`` in fp32, with the configured scaling applied."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.to(torch.float32)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Cos/sin tables ``[*positions.shape, head_dim]`` for integer ``positions`` (any shape)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim. Secret tensors take a public signed permutation (a local
    operation under MPC) instead of ``torch.cat``."""
    half = x.shape[-1] // 2
    if isinstance(x, torch.Tensor):
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x.matmul(_rotation_matrix(x.shape[-1]))


@functools.lru_cache(maxsize=8)
def _rotation_matrix(d: int) -> torch.Tensor:
    half = d // 2
    rot = torch.zeros(d, d)
    rot[torch.arange(half) + half, torch.arange(half)] = -1.0
    rot[torch.arange(half), torch.arange(half) + half] = 1.0
    return rot


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, d]`` with tables ``[B, T, d]`` (broadcast over heads)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys by ``delta`` positions (same shape as keys without the last dim)."""
    cos, sin = cos_sin(inv_freq, delta, torch.float32)
    out = keys.float() * cos + rotate_half(keys.float()) * sin
    return out.to(keys.dtype)
