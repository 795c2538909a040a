"""Observation-window column scores (SnapKV / H2O style importance of each cached key).

For every query of the last-``w`` observation window, a causal softmax over the visible keys is
computed in fp32; the probabilities are summed over the window rows and then reduced over the ``G``
query heads that share a KV head (GQA), giving one score per cached key and KV head.
"""

from __future__ import annotations

import math

import torch

from ._common import (
    HAS_TRITON,
    GroupReduce,
    Impl,
    check_group_reduce,
    check_lengths,
    next_pow2,
    reduce_groups,
    resolve_impl,
    tl,
    triton,
    use_f32_dot,
)

__all__ = ["HAS_TRITON", "window_column_scores"]

#: Upper bound on the number of fp32 score elements the torch path materialises at once.
_TORCH_CHUNK_ELEMS = 1 << 26


def _window_column_scores_torch(
    q_win: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    group_reduce: str,
) -> torch.Tensor:
    """Pure-torch reference of :func:`window_column_scores` (window rows processed in chunks)."""
    B, H, W, D = q_win.shape
    Hk, L = k.shape[1], k.shape[2]
    G = H // Hk
    kf = k.float()
    j = torch.arange(L, device=k.device)
    valid = j.view(1, 1, L) < lengths.to(k.device).view(B, Hk, 1)  # [B, Hk, L]
    pos = q_pos.to(k.device)
    acc = torch.zeros(B, Hk, G, L, dtype=torch.float32, device=k.device)
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, B * H * L))
    for w0 in range(0, W if L > 0 else 0, chunk):
        w1 = min(W, w0 + chunk)
        q = q_win[:, :, w0:w1].float().reshape(B, Hk, G, w1 - w0, D)
        s = torch.einsum("bkgwd,bkld->bkgwl", q, kf) * scale
        causal = j.view(1, 1, L) <= pos[:, w0:w1].view(B, w1 - w0, 1)  # [B, wc, L]; q_pos < 0 -> all False
        mask = valid[:, :, None, None, :] & causal[:, None, None, :, :]
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        acc += p.sum(dim=3)
    return reduce_groups(acc, group_reduce, dim=2)


if HAS_TRITON:

    @triton.jit
    def _win_lse_kernel(
        q_ptr, k_ptr, len_ptr, pos_ptr, lse_ptr,
        sqb, sqh, sqw, sqd, skb, skh, skl, skd, slb, slh, spb, spw,
        H, G, W, L, D, scale,
        BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    ):  # fmt: skip
        # Pass 1: per window row, log-sum-exp of the visible scaled scores (+inf for rows seeing nothing).
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        hk = h // G
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        offs_l = tl.arange(0, BLOCK_L)
        wmask = offs_w < W
        q = tl.load(
            q_ptr + b * sqb + h * sqh + offs_w[:, None] * sqw + offs_d[None, :] * sqd,
            mask=wmask[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        pos = tl.load(pos_ptr + b * spb + offs_w * spw, mask=wmask, other=-1)
        length = tl.minimum(tl.load(len_ptr + b * slb + hk * slh), L)
        hi = tl.minimum(length, tl.max(pos, axis=0) + 1)
        m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_W], tl.float32)
        for start in range(0, hi, BLOCK_L):
            cols = start + offs_l
            kt = tl.load(
                k_ptr + b * skb + hk * skh + cols[:, None] * skl + offs_d[None, :] * skd,
                mask=(cols[:, None] < length) & (offs_d[None, :] < D),
                other=0.0,
            )
            if DOT_F32:
                s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            vis = (cols[None, :] < length) & (cols[None, :] <= pos[:, None])
            s = tl.where(vis, s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + pid * W + offs_w, lse, mask=wmask)

    @triton.jit
    def _win_accum_kernel(
        q_ptr, k_ptr, len_ptr, pos_ptr, lse_ptr, out_ptr,
        sqb, sqh, sqw, sqd, skb, skh, skl, skd, slb, slh, spb, spw,
        Hk, G, W, L, D, scale,
        REDUCE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):  # fmt: skip
        # Pass 2: one block of keys of one KV head; sum exp(s - lse) over window rows, reduce over group.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // Hk
        hk = pid % Hk
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, BLOCK_D)
        offs_w = tl.arange(0, BLOCK_W)
        length = tl.minimum(tl.load(len_ptr + b * slb + hk * slh), L)
        kt = tl.load(
            k_ptr + b * skb + hk * skh + cols[:, None] * skl + offs_d[None, :] * skd,
            mask=(cols[:, None] < length) & (offs_d[None, :] < D),
            other=0.0,
        )
        if DOT_F32:
            kt = kt.to(tl.float32)
        if REDUCE == 2:
            res = tl.full([BLOCK_L], float("-inf"), tl.float32)
        else:
            res = tl.zeros([BLOCK_L], tl.float32)
        for g in range(0, G):
            h = hk * G + g
            acc = tl.zeros([BLOCK_L], tl.float32)
            for w0 in range(0, W, BLOCK_W):
                rows = w0 + offs_w
                rmask = rows < W
                q = tl.load(
                    q_ptr + b * sqb + h * sqh + rows[:, None] * sqw + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & (offs_d[None, :] < D),
                    other=0.0,
                )
                pos = tl.load(pos_ptr + b * spb + rows * spw, mask=rmask, other=-1)
                lse = tl.load(lse_ptr + (b * Hk * G + h) * W + rows, mask=rmask, other=float("inf"))
                if DOT_F32:
                    s = tl.dot(q.to(tl.float32), tl.trans(kt), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(kt))
                vis = (cols[None, :] < length) & (cols[None, :] <= pos[:, None])
                p = tl.where(vis, tl.exp(s * scale - lse[:, None]), 0.0)
                acc += tl.sum(p, axis=0)
            if REDUCE == 2:
                res = tl.maximum(res, acc)
            else:
                res += acc
        if REDUCE == 0:
            res = res / G
        tl.store(out_ptr + pid * L + cols, res, mask=cols < L)


def _window_column_scores_triton(
    q_win: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    group_reduce: str,
    block_l: int = 64,
    block_w: int = 16,
) -> torch.Tensor:
    """Triton implementation of :func:`window_column_scores` (two passes over the key blocks)."""
    B, H, W, D = q_win.shape
    Hk, L = k.shape[1], k.shape[2]
    G = H // Hk
    lengths = lengths.to(device=k.device, dtype=torch.int64)
    q_pos = q_pos.to(device=k.device, dtype=torch.int64)
    lse = torch.empty(B, H, W, dtype=torch.float32, device=k.device)
    out = torch.empty(B, Hk, L, dtype=torch.float32, device=k.device)
    if B * H * W == 0 or L == 0:
        return out.zero_()
    block_d = max(16, next_pow2(D))
    f32 = use_f32_dot(q_win.dtype, _win_lse_kernel)
    strides = (*q_win.stride(), *k.stride(), *lengths.stride(), *q_pos.stride())
    _win_lse_kernel[(B * H, triton.cdiv(W, block_w))](
        q_win, k, lengths, q_pos, lse, *strides, H, G, W, L, D, float(scale),
        BLOCK_W=block_w, BLOCK_L=block_l, BLOCK_D=block_d, DOT_F32=f32,
    )  # fmt: skip
    _win_accum_kernel[(B * Hk, triton.cdiv(L, block_l))](
        q_win, k, lengths, q_pos, lse, out, *strides, Hk, G, W, L, D, float(scale),
        REDUCE=check_group_reduce(group_reduce), BLOCK_W=block_w, BLOCK_L=block_l, BLOCK_D=block_d,
        DOT_F32=f32,
    )  # fmt: skip
    return out


def window_column_scores(
    q_win: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float,
    group_reduce: GroupReduce = "mean",
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-key importance scores from the attention of an observation window of queries.

    For each window query ``i`` of query head ``h`` the softmax of ``scale * q·k_j`` is taken, in fp32,
    over the keys it can see: ``j <= q_pos[b, i]`` and ``j < lengths[b, h // G]``. The probabilities
    are summed over the ``w`` window rows, then reduced over the ``G`` query heads of each KV head.

    Parameters
    ----------
    q_win
        Window queries ``[B, H, w, d]`` (fp32, fp16 or bf16), ``H = Hk * G``.
    k
        Padded key cache ``[B, Hk, L, d]``, same dtype as ``q_win``. Entries at index ``>= lengths``
        are ignored (they may hold garbage, even NaN).
    lengths
        Valid length per (batch, KV head), integer tensor ``[B, Hk]``.
    q_pos
        Cache index (= position) of each window query, integer tensor ``[B, w]``. Rows with a negative
        position are padding and contribute nothing.
    scale
        Multiplier of the dot products (usually ``d ** -0.5``).
    group_reduce
        Reduction over the query heads of a group: ``"mean"`` (default), ``"sum"`` or ``"max"``.
    impl
        ``"auto"`` (Triton for CUDA inputs when available, else torch), ``"torch"`` or ``"triton"``.

    Returns
    -------
    torch.Tensor
        fp32 scores ``[B, Hk, L]``; keys that no window row can see (invalid or in the future of every
        row) score exactly 0.

    Raises
    ------
    ValueError
        On inconsistent shapes or dtypes, or an unknown ``group_reduce``.
    RuntimeError
        When ``impl="triton"`` cannot run (see :func:`mpckv.kernels._common.resolve_impl`).
    """
    if q_win.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q_win and k must be 4-D, got {list(q_win.shape)} and {list(k.shape)}")
    B, H, W, D = q_win.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"incompatible q_win {list(q_win.shape)} and k {list(k.shape)} (need H % Hk == 0)")
    if q_win.dtype != k.dtype or not q_win.dtype.is_floating_point:
        raise ValueError(f"q_win and k must share a floating dtype, got {q_win.dtype} and {k.dtype}")
    check_lengths(lengths, B, k.shape[1])
    check_lengths(q_pos, B, W, name="q_pos")
    check_group_reduce(group_reduce)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    which = resolve_impl(impl, (q_win, k), _win_lse_kernel if HAS_TRITON else None)
    if which == "triton":
        return _window_column_scores_triton(q_win, k, lengths, q_pos, scale, group_reduce)
    return _window_column_scores_torch(q_win, k, lengths, q_pos, scale, group_reduce)
