"""Fast column sums of the causal prompt attention of *all* prompt queries (H2O / Keyformer prefill scores).

:func:`causal_column_sums` returns, per query head, ``S[b, h, j] = Σ_{i<n_b} softmax_j(x_i)`` with
``x_ij = scale·q_i·k_j`` over the keys ``j ≤ i`` (fp32), optionally with a temperature and additive noise
``softmax((x + c·ζ)/τ)`` (Keyformer). It gives the same numbers as
:func:`mpckv.plaintext.methods.scorers.window_votes` with a window covering the whole prompt (up to fp32
rounding: the scale is folded into the queries and the row sums run over a shorter row), but is several
times faster on CPU because

* query rows are processed in blocks ``[r0, r1)`` against the keys ``[0, r1)`` only — the keys in every
  row's future are never multiplied, exponentiated or summed (half of the ``T × T`` work);
* only the diagonal block needs the causal mask: every valid row ``i < n_b`` sees exactly the keys
  ``j ≤ i < n_b``, so no length mask is built, and padded rows are dropped after the softmax;
* the GQA group shares one batched matmul against its KV head (no ``repeat_interleave`` of the keys) and
  the softmax runs in a single fused call.

:func:`all_query_votes` wraps it for a :class:`PrefillContext` (group-reduced like ``window_votes``) and
falls back to ``window_votes`` (Triton) on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpckv.plaintext.methods.base import PrefillContext
from mpckv.plaintext.methods.scorers import _require_fresh, reduce_group, window_votes

#: Query rows per block; also the block of a noise draw (see :data:`NoiseFn`).
ROW_BLOCK = 256
#: Upper bound on fp32 elements of one block's logits (``B·H·rows·keys``).
_MAX_ELEMS = 1 << 25

#: ``noise(r0, rows, keys) -> [H, rows, keys]`` additive logit noise of the query rows ``r0 … r0+rows-1``
#: against the keys ``0 … keys-1`` (shared by the samples of a batch); ``r0`` is a multiple of
#: :data:`ROW_BLOCK`.
NoiseFn = Callable[[int, int, int], torch.Tensor]


def causal_column_sums(
    q: torch.Tensor,
    keys: torch.Tensor,
    prompt_lengths: torch.Tensor,
    scale: float,
    tau: float = 1.0,
    noise: NoiseFn | None = None,
    noise_scale: float = 1.0,
) -> torch.Tensor:
    """Column sums ``[B, H, L]`` (fp32) of ``softmax((scale·q·kᵀ + noise_scale·ζ)/τ)`` over causal rows.

    ``q [B, H, T, d]`` holds the prompt queries (row ``i`` at position ``i``, right padded),
    ``keys [B, Hk, L, d]`` the uncompacted prompt keys (``L ≥ T``; entries at ``j ≥ n_b`` may be garbage),
    ``prompt_lengths [B]`` the real lengths ``n_b``. Rows ``i ≥ n_b`` contribute nothing; columns
    ``j ≥ n_b`` are 0. ``noise`` (optional) supplies ``ζ`` block by block.
    """
    b, h, t, d = q.shape
    hk, n_keys = keys.shape[1], keys.shape[2]
    g = h // hk
    out = torch.zeros(b, hk, g, n_keys, dtype=torch.float32, device=q.device)
    lengths = prompt_lengths.to(q.device).long()
    t_eff = min(t, int(lengths.max())) if b else 0
    if t_eff <= 0:
        return out.view(b, h, n_keys)
    kf = keys.float()
    qs = q.float() * (scale / tau)
    # rows per block: a multiple of ROW_BLOCK when noise is drawn (its draws are keyed by block)
    rows = max(1, _MAX_ELEMS // max(1, b * h * t_eff))
    rows = max(ROW_BLOCK, rows // ROW_BLOCK * ROW_BLOCK) if noise is not None else min(rows, ROW_BLOCK)
    for r0 in range(0, t_eff, rows):
        r1 = min(r0 + rows, t_eff)
        c = r1 - r0
        x = qs[:, :, r0:r1].reshape(b, hk, g * c, d) @ kf[:, :, :r1].transpose(-1, -2)
        x = x.view(b, hk, g, c, r1)
        if noise is not None:
            parts = [noise(s, min(ROW_BLOCK, r1 - s), r1) for s in range(r0, r1, ROW_BLOCK)]
            z = torch.cat(parts, dim=1).to(x.device)  # [H, c, r1]
            x += z.view(hk, g, c, r1) * (noise_scale / tau)
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
        x[..., r0:r1].masked_fill_(future, float("-inf"))
        p = torch.softmax(x, dim=-1)
        pad = torch.arange(r0, r1, device=q.device)[None, :] >= lengths[:, None]  # [B, c]
        if bool(pad.any()):
            p = p.masked_fill(pad[:, None, None, :, None], 0.0)
        out[..., :r1] += p.sum(3)
    return out.view(b, h, n_keys)


def all_query_votes(
    ctx: PrefillContext, group_reduce: str = "sum", per_query_head: bool = False
) -> torch.Tensor:
    """``window_votes(ctx, T, group_reduce, per_query_head)`` — column sums of all prompt queries — via
    :func:`causal_column_sums` (torch, CPU-friendly); CUDA inputs keep ``window_votes``' Triton kernel.
    """
    _require_fresh(ctx)
    cache = ctx.cache
    fresh = bool((cache.lengths == ctx.prompt_lengths.to(cache.lengths.device)[:, None]).all())
    if ctx.q.is_cuda or not fresh:
        return window_votes(ctx, ctx.q.shape[2], group_reduce, per_query_head)

    def compute() -> torch.Tensor:
        keys = cache.keys()
        q = ctx.q.to(keys.dtype) if ctx.q.dtype != keys.dtype else ctx.q
        return causal_column_sums(q, keys, ctx.prompt_lengths, ctx.scale)

    per_head = ctx.memoized(("all_query_votes",), compute)
    return per_head if per_query_head else reduce_group(per_head, cache.kv_heads, group_reduce)
