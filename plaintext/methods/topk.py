"""One deterministic top-k with forced and invalid masks, shared by every method.

Ties go to the lower index (a stable descending sort), forced entries are always kept, invalid entries
never, and the kept indices of each row are returned in ascending order with the valid ones first.
"""

from __future__ import annotations

import torch

from mpckv.errors import ShapeError


def select_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    forced: torch.Tensor | None = None,
    invalid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``k`` best entries of every row of ``scores [..., N]``.

    Parameters
    ----------
    scores:
        Any float tensor; NaN is treated as the lowest score.
    k:
        Entries to keep per row: an int or a LongTensor of shape ``scores.shape[:-1]``. Clamped to the
        number of valid entries of the row; forced entries are kept even when they exceed ``k``.
    forced, invalid:
        Boolean masks like ``scores``. An entry both forced and invalid counts as invalid.

    Returns
    -------
    index, valid:
        ``[..., K]`` with ``K = max kept count``; ``index`` sorted ascending among valid columns, valid
        columns first, padding columns hold index 0.
    """
    n = scores.shape[-1]
    lead = scores.shape[:-1]
    dev = scores.device
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    inv = invalid if invalid is not None else torch.zeros_like(s, dtype=torch.bool)
    frc = (forced & ~inv) if forced is not None else torch.zeros_like(s, dtype=torch.bool)
    for name, m in (("forced", frc), ("invalid", inv)):
        if m.shape != s.shape:
            raise ShapeError(f"{name} mask shape {tuple(m.shape)} != scores shape {tuple(s.shape)}")
    kk = torch.as_tensor(k, device=dev, dtype=torch.long).expand(lead)
    n_valid = (~inv).sum(-1)
    kk = torch.maximum(kk, frc.sum(-1)).minimum(n_valid).clamp_min(0)
    # rank: forced first, then by score, invalid last; stable sort keeps lower indices first on ties
    rank = torch.where(frc, torch.full_like(s, float("inf")), s.clamp(min=torch.finfo(torch.float32).min))
    rank = torch.where(inv, torch.full_like(s, float("-inf")), rank)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    kmax = int(kk.max()) if kk.numel() else 0
    top = order[..., :kmax]
    col = torch.arange(kmax, device=dev)
    valid = col < kk[..., None]
    big = torch.full_like(top, n)
    top_sorted = torch.sort(torch.where(valid, top, big), dim=-1).values
    index = torch.where(valid, top_sorted, torch.zeros_like(top_sorted))
    return index, valid


def topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` (ascending) of the ``k`` best entries of every row, ties to the lower index.

    The same set as :func:`select_topk` without masks (callers set forced entries to ``+inf`` and invalid
    ones to ``-inf``) for a row-independent ``k <= N``. ``torch.topk`` picks the set (several times faster
    than a stable sort on CPU); only when the ``k``-th and ``(k+1)``-th values tie, where ``topk`` does not
    promise which index wins, the stable sort decides.
    """
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    vals, idx = torch.topk(scores, k + 1, dim=-1)
    if bool((vals[..., k - 1] == vals[..., k]).any()):
        idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(idx[..., :k], dim=-1).values
