"""Merging runs of consecutive similar keys into one entry (KVMerger), vectorised with segment ops.

A *merging set* is a maximal run of consecutive candidate entries of one row whose adjacent keys have
cosine similarity ``≥ threshold``; every other entry is a singleton set. Each set collapses into one entry
stored at its *pivot* (the entry with the highest score, ties to the lower index) with the pivot's
position: ``k* = Σ w_i k_i``, ``v* = Σ w_i v_i``, ``w_i ∝ exp(−‖k_p − k_i‖² / (2σ²))``. The cache then
really shrinks by compaction to the pivots (:meth:`LayerCache.compact`).

All steps are O(N·d) per row: adjacent cosine → boundary flags → segment ids by a prefix sum → segmented
arg-max (``scatter_reduce``) → weights → segmented weighted sums (``index_add_``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def adjacent_cosine(keys: torch.Tensor) -> torch.Tensor:
    """``cos(k_j, k_{j+1})`` in fp32 for ``keys [..., L, d]`` → ``[..., L − 1]`` (0 for zero keys)."""
    k = keys.float()
    dot = (k[..., :-1, :] * k[..., 1:, :]).sum(-1)
    norm = k.norm(dim=-1)
    den = norm[..., :-1] * norm[..., 1:]
    return torch.where(den > 0, dot / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def merge_set_ids(similarity: torch.Tensor, candidate: torch.Tensor, threshold: float) -> torch.Tensor:
    """Set ids ``[R, L]`` (global over the ``R`` rows, ascending) from ``similarity [R, L − 1]``.

    A new set starts at every row start, at every non-candidate entry, right after one, and wherever the
    similarity to the previous entry is below ``threshold``.
    """
    r, length = candidate.shape
    start = torch.ones(r, length, dtype=torch.bool, device=candidate.device)
    if length > 1:
        joined = candidate[:, 1:] & candidate[:, :-1] & (similarity >= threshold)
        start[:, 1:] = ~joined
    return torch.cumsum(start.reshape(-1).long(), 0).view(r, length) - 1


@dataclass
class MergeResult:
    """Per entry of the flattened rows: its set id, the set's pivot (flat index), its weight; per set:
    the merged key, value and score sum."""

    set_id: torch.Tensor  # [R·L]
    pivot: torch.Tensor  # [S] flat index of each set's pivot
    weight: torch.Tensor  # [R·L] fp32, sums to 1 over each set
    keys: torch.Tensor  # [S, d] fp32
    values: torch.Tensor  # [S, d] fp32
    scores: torch.Tensor  # [S] fp32
    sizes: torch.Tensor  # [S]


def merge_runs(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, set_id: torch.Tensor, sigma: float = 0.0
) -> MergeResult:
    """Gaussian-kernel merge of every set: ``keys, values [R, L, d]``, ``scores [R, L]``, ``set_id [R, L]``.

    ``sigma > 0`` fixes σ; ``0`` uses the per-set rule ``σ² = mean_{i∈S} ‖k_p − k_i‖²`` (clamped ≥ 1e-6).
    """
    d = keys.shape[-1]
    k = keys.reshape(-1, d).float()
    v = values.reshape(-1, values.shape[-1]).float()
    a = torch.nan_to_num(scores.reshape(-1).float(), nan=0.0)  # ±inf are clamped to the largest finite
    sid = set_id.reshape(-1)
    n_sets = int(sid.max()) + 1 if sid.numel() else 0
    dev = k.device
    flat = torch.arange(sid.numel(), device=dev)
    best = torch.full((n_sets,), float("-inf"), device=dev).scatter_reduce(0, sid, a, "amax")
    is_best = a == best[sid]
    none = torch.full((n_sets,), sid.numel(), device=dev, dtype=torch.long)
    pivot = none.scatter_reduce(0, sid, torch.where(is_best, flat, sid.numel()), "amin")
    sizes = torch.zeros(n_sets, device=dev, dtype=torch.long).index_add_(0, sid, torch.ones_like(sid))
    dist2 = (k - k[pivot[sid]]).pow(2).sum(-1)
    if sigma > 0:
        two_s2 = torch.full((n_sets,), 2.0 * sigma * sigma, device=dev)
    else:
        mean = torch.zeros(n_sets, device=dev).index_add_(0, sid, dist2) / sizes.float()
        two_s2 = 2.0 * mean.clamp_min(1e-6)
    gw = torch.exp(-dist2 / two_s2[sid])
    wsum = torch.zeros(n_sets, device=dev).index_add_(0, sid, gw)
    w = gw / wsum[sid]
    km = torch.zeros(n_sets, d, device=dev).index_add_(0, sid, w[:, None] * k)
    vm = torch.zeros(n_sets, v.shape[1], device=dev).index_add_(0, sid, w[:, None] * v)
    am = torch.zeros(n_sets, device=dev).index_add_(0, sid, a)
    return MergeResult(sid, pivot, w, km, vm, am, sizes)
