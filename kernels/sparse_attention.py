"""Sparse decode attention: one query per head over per-KV-head index lists into a padded GQA cache.

A selection method (Quest, MPCache, …) picks, for every (batch, KV head), ``counts[b, hk]`` cache entries
``index[b, hk, :counts]``. The torch path gathers exactly those entries and runs
:func:`~mpckv.kernels.decode_attention.decode_attention` on the gathered rows (the gather copies the
selected entries only). The Triton path never materialises the gather: every program walks a chunk of
its row's index list, loads the indexed K/V rows straight from the cache and keeps an online softmax
(flash-decoding), all ``G`` query heads of a KV head sharing each loaded row; chunk partials are merged
in torch. Reading ``counts`` rows of K and V is the memory floor of the step.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, Impl, check_lengths, next_pow2, resolve_impl, tl, triton, use_f32_dot
from .decode_attention import decode_attention

__all__ = ["HAS_TRITON", "fused_sparse_available", "gather_rows", "sparse_decode_attention"]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, h, index[b, h, j]]`` of ``x [B, Hk, L, d]`` for an integer ``index [B, Hk, K]``.

    Equal to ``torch.gather(x, 2, index[..., None].expand(..., d))``, but when the rows of ``x`` are
    contiguous ``d``-vectors laid out head after head (a cache tensor or a prefix slice of one) it is one
    ``index_select`` of whole rows on a flat view, several times faster on CPU than an element-wise gather.
    """
    b, hk, kk = index.shape
    d = x.shape[-1]
    st = x.stride()
    rows = st[1] // d if d else 0
    if d and st[3] == 1 and st[2] == d and st[1] % d == 0 and st[0] == hk * st[1] and rows >= x.shape[2]:
        flat = x.as_strided((b * hk * rows, d), (d, 1))
        base = torch.arange(b * hk, device=index.device).view(b, hk, 1) * rows
        return flat.index_select(0, (base + index).reshape(-1)).view(b, hk, kk, d)
    return torch.gather(x, 2, index[..., None].expand(b, hk, kk, d))


def _sparse_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
    scale: float, keep: torch.Tensor | None, return_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    idx = index.clamp(0, max(k.shape[2] - 1, 0))
    ks, vs = gather_rows(k, idx), gather_rows(v, idx)
    return decode_attention(
        q, ks, vs, counts, scale=scale, keep=keep, return_probs=return_probs, impl="torch"
    )


if HAS_TRITON:

    @triton.jit
    def _sparse_partial_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, keep_ptr, m_ptr, l_ptr, acc_ptr,
        sqb, sqh, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sib, sih, sik, scb, sch, seb, seh, sek,
        Hk, G, K, L, D, DV, S, chunk, scale,
        HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        b = pid // Hk
        hk = pid % Hk
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_DV)
        offs_k = tl.arange(0, BLOCK_K)
        gmask = offs_g < G
        q = tl.load(
            q_ptr + b * sqb + (hk * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
            mask=gmask[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        count = tl.minimum(tl.load(cnt_ptr + b * scb + hk * sch), K)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, count)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for start in range(lo, hi, BLOCK_K):
            cols = start + offs_k
            cmask = cols < hi
            rows = tl.load(idx_ptr + b * sib + hk * sih + cols * sik, mask=cmask, other=0)
            cmask = cmask & (rows >= 0) & (rows < L)
            rows = tl.where(cmask, rows, 0).to(tl.int64)
            kt = tl.load(
                k_ptr + b * skb + hk * skh + rows[:, None] * skl + offs_d[None, :] * skd,
                mask=cmask[:, None] & (offs_d[None, :] < D),
                other=0.0,
            )
            if DOT_F32:
                s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            vis = cmask
            if HAS_KEEP:
                kp = tl.load(keep_ptr + b * seb + hk * seh + cols * sek, mask=cmask, other=0)
                vis = vis & (kp != 0)
            s = tl.where(vis[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            vt = tl.load(
                v_ptr + b * svb + hk * svh + rows[:, None] * svl + offs_e[None, :] * svd,
                mask=vis[:, None] & (offs_e[None, :] < DV),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        row = (b * Hk * G + hk * G + offs_g) * S + split
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(
            acc_ptr + row[:, None] * DV + offs_e[None, :], acc, mask=gmask[:, None] & (offs_e[None, :] < DV)
        )


def _sparse_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
    scale: float, keep: torch.Tensor | None, return_probs: bool, num_splits: int | None = None,
    block_k: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    B, H, D = q.shape
    Hk, L, DV = k.shape[1], k.shape[2], v.shape[3]
    K = index.shape[2]
    G = H // Hk
    dev = q.device
    if return_probs or B * H == 0 or K == 0 or L == 0:  # probabilities: the gathered path writes them
        return _sparse_torch(q, k, v, index, counts, scale, keep, return_probs)
    counts = counts.to(device=dev, dtype=torch.int64)
    index = index.to(device=dev, dtype=torch.int64)
    keep_t = counts if keep is None else keep.to(device=dev, dtype=torch.bool).view(torch.uint8)
    keep_strides = (0, 0, 0) if keep is None else tuple(keep_t.stride())
    n_blocks = triton.cdiv(K, block_k)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 1
        num_splits = triton.cdiv(2 * sms, B * Hk)
    S = max(1, min(int(num_splits), n_blocks))
    chunk = triton.cdiv(n_blocks, S) * block_k
    m = torch.empty(B, H, S, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m)
    acc = torch.empty(B, H, S, DV, dtype=torch.float32, device=dev)
    _sparse_partial_kernel[(B * Hk, S)](
        q, k, v, index, counts, keep_t, m, l_part, acc,
        *q.stride(), *k.stride(), *v.stride(), *index.stride(), *counts.stride(), *keep_strides,
        Hk, G, K, L, D, DV, S, chunk, float(scale),
        HAS_KEEP=keep is not None, DOT_F32=use_f32_dot(q.dtype, _sparse_partial_kernel),
        BLOCK_G=max(16, next_pow2(G)), BLOCK_K=block_k, BLOCK_D=max(16, next_pow2(D)),
        BLOCK_DV=max(16, next_pow2(DV)),
    )  # fmt: skip
    m_max = m.amax(dim=-1, keepdim=True)
    m_max = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    w = torch.exp(m - m_max)
    l_tot = (l_part * w).sum(dim=-1)
    out = (acc * w[..., None]).sum(dim=-2) / l_tot.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out.to(q.dtype), None


def fused_sparse_available(q: torch.Tensor) -> bool:
    """Whether :func:`sparse_decode_attention` with ``impl="auto"`` runs the Triton kernel for ``q``'s
    device (CUDA with Triton installed); otherwise the engine gathers and times the gather separately."""
    return HAS_TRITON and q.is_cuda


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    counts: torch.Tensor,
    *,
    scale: float,
    keep: torch.Tensor | None = None,
    return_probs: bool = False,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention of ``q [B, H, d]`` over the cache rows ``index[b, hk, :counts[b, hk]]``.

    Equal to :func:`~mpckv.kernels.decode_attention.decode_attention` over the gathered rows
    ``k[b, hk, index[b, hk]]`` with lengths ``counts``.

    Parameters
    ----------
    q
        Queries ``[B, H, d]``; head ``h`` reads KV head ``h // (H / Hk)``.
    k, v
        Padded caches ``[B, Hk, L, d]`` / ``[B, Hk, L, dv]`` (only indexed rows are read).
    index
        Integer ``[B, Hk, K]``: cache rows to attend, valid columns first; columns ``>= counts`` ignored.
    counts
        Integer ``[B, Hk]``: valid columns of every row.
    scale
        Multiplier of the dot products.
    keep
        Optional bool ``[B, Hk, K]`` aligned with ``index`` (e.g. a sliding window).
    return_probs
        Also return fp32 probabilities ``[B, H, K]`` in index order (the torch path computes them).
    impl
        ``"auto"`` (Triton for CUDA tensors when available), ``"torch"`` or ``"triton"``.

    Returns
    -------
    out, probs
        ``[B, H, dv]`` in ``q``'s dtype (zeros for rows with nothing visible) and the probabilities or
        ``None``.
    """
    if q.dim() != 3 or k.dim() != 4 or v.dim() != 4 or index.dim() != 3:
        raise ValueError(f"bad ranks: q {list(q.shape)}, k {list(k.shape)}, index {list(index.shape)}")
    B, H, D = q.shape
    Hk = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3] or Hk == 0 or H % Hk != 0:
        raise ValueError(f"incompatible q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if tuple(index.shape[:2]) != (B, Hk) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(
            f"index must be an integer [{B}, {Hk}, K] tensor, got {index.dtype} {list(index.shape)}"
        )
    check_lengths(counts, B, Hk, name="counts")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != index.shape):
        raise ValueError(f"keep must be a bool tensor shaped like index, got {keep.dtype} {list(keep.shape)}")
    which = resolve_impl(impl, (q, k, v, index), _sparse_partial_kernel if HAS_TRITON else None)
    if which == "triton":
        return _sparse_triton(q, k, v, index, counts, scale, keep, return_probs)
    return _sparse_torch(q, k, v, index, counts, scale, keep, return_probs)
