"""Attention entry points used by the engine.

* :func:`prefill_attention` — dense causal attention over right-padded prompts through
  ``torch.nn.functional.scaled_dot_product_attention`` (GQA without repeating K/V).
* :func:`cache_attention` — one decode query per sequence over a padded, ragged KV cache, optionally
  restricted to a selection and optionally returning the attention probabilities (H2O needs them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_mask(
    t: int, lengths: torch.Tensor, sliding_window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, T]``: causal, keys beyond each prompt's length hidden, optional window."""
    dev = device or lengths.device
    i = torch.arange(t, device=dev)
    allowed = i[None, :] <= i[:, None]
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    key_ok = i[None, :] < lengths.to(dev)[:, None]
    return allowed[None, None] & key_ok[:, None, None, :]


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Dense causal attention ``q [B,H,T,d]``, ``k, v [B,Hk,T,d]`` → ``[B,H,T,d]``."""
    b, h, t, _ = q.shape
    full = bool((lengths == t).all()) and sliding_window is None
    gqa = h != k.shape[1]
    if full:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = prefill_mask(t, lengths, sliding_window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention of ``q [B,H,d]`` over ``k, v [B,Hk,L,d]`` with valid ``lengths [B,Hk]``.

    ``keep [B,Hk,L]`` further restricts the attended entries. Returns ``out [B,H,d]`` and, when asked,
    ``probs [B,H,L]`` in fp32 (zero outside the attended set).
    """
    from mpckv.kernels.decode_attention import decode_attention

    return decode_attention(q, k, v, lengths, scale=scale, keep=keep, return_probs=return_probs)
