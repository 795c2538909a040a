"""Single-token (decode) attention over a padded, possibly sparsified GQA KV cache.

The Triton path is flash-decoding style: the keys of each (batch, KV head) are split into chunks
processed by independent programs with an online softmax; every program handles all ``G`` query
heads of its group, so each key/value block is read once per group. Partial results are merged in
torch, and an optional cheap second pass writes the normalised probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, Impl, check_lengths, next_pow2, resolve_impl, tl, triton, use_f32_dot

__all__ = ["HAS_TRITON", "decode_attention"]


def _visible(lengths: torch.Tensor, keep: torch.Tensor | None, L: int, device: torch.device) -> torch.Tensor:
    B, Hk = lengths.shape
    mask = torch.arange(L, device=device).view(1, 1, L) < lengths.to(device).view(B, Hk, 1)
    return mask if keep is None else mask & keep.to(device=device, dtype=torch.bool)


def _scores(qg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``qg [B, Hk, G, D] · k [B, Hk, L, D]ᵀ`` in fp32 as ``[B, Hk, G, L]``, computed as ``k @ qgᵀ`` (a
    tall-skinny product over the cache, about 2× faster than ``qg @ kᵀ`` with CPU BLAS at long L)."""
    return (k.float() @ qg.float().transpose(-1, -2)).transpose(-1, -2)


def _decode_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
    return_probs: bool, keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    B, H, D = q.shape
    Hk, L, DV = k.shape[1], k.shape[2], v.shape[3]
    if L == 0:
        probs = torch.zeros(B, H, 0, dtype=torch.float32, device=q.device) if return_probs else None
        return torch.zeros(B, H, DV, dtype=q.dtype, device=q.device), probs
    if keep is None and int(lengths.min()) >= L:  # every entry visible: no mask, no copy of V
        qg = q.view(B, Hk, H // Hk, D)
        if not return_probs and q.dtype == torch.float32:  # fused (flash) kernel, reads K and V once
            out = F.scaled_dot_product_attention(qg, k, v, scale=scale)
            return out.reshape(B, H, DV), None
        s = _scores(qg, k) * scale
        p = torch.softmax(s, dim=-1)
        out = (p @ v.float()).reshape(B, H, DV).to(q.dtype)
        return out, (p.reshape(B, H, L) if return_probs else None)
    mask = _visible(lengths, keep, L, k.device)[:, :, None, :]  # [B, Hk, 1, L]
    s = _scores(q.view(B, Hk, H // Hk, D), k) * scale  # [B, Hk, G, L]
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    vf = torch.where(mask.transpose(-1, -2), v.float(), 0.0)  # garbage (even NaN) never reaches the output
    out = (p @ vf).reshape(B, H, DV).to(q.dtype)
    return out, (p.reshape(B, H, L) if return_probs else None)


if HAS_TRITON:

    @triton.jit
    def _decode_partial_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, keep_ptr, m_ptr, l_ptr, acc_ptr,
        sqb, sqh, sqd, skb, skh, skl, skd, svb, svh, svl, svd, slb, slh, seb, seh, sel,
        Hk, G, L, D, DV, S, chunk, scale,
        HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        b = pid // Hk
        hk = pid % Hk
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_DV)
        offs_l = tl.arange(0, BLOCK_L)
        gmask = offs_g < G
        q = tl.load(
            q_ptr + b * sqb + (hk * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
            mask=gmask[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        length = tl.minimum(tl.load(len_ptr + b * slb + hk * slh), L)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for start in range(lo, hi, BLOCK_L):
            cols = start + offs_l
            cmask = cols < hi
            kt = tl.load(
                k_ptr + b * skb + hk * skh + cols[:, None] * skl + offs_d[None, :] * skd,
                mask=cmask[:, None] & (offs_d[None, :] < D),
                other=0.0,
            )
            if DOT_F32:
                s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            vis = cmask
            if HAS_KEEP:
                kp = tl.load(keep_ptr + b * seb + hk * seh + cols * sel, mask=cmask, other=0)
                vis = vis & (kp != 0)
            s = tl.where(vis[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            vt = tl.load(
                v_ptr + b * svb + hk * svh + cols[:, None] * svl + offs_e[None, :] * svd,
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

    @triton.jit
    def _decode_probs_kernel(
        q_ptr, k_ptr, len_ptr, keep_ptr, lse_ptr, p_ptr,
        sqb, sqh, sqd, skb, skh, skl, skd, slb, slh, seb, seh, sel,
        Hk, G, L, D, scale,
        HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        b = pid // Hk
        hk = pid % Hk
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        gmask = offs_g < G
        length = tl.minimum(tl.load(len_ptr + b * slb + hk * slh), L)
        vis = cols < length
        q = tl.load(
            q_ptr + b * sqb + (hk * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
            mask=gmask[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        kt = tl.load(
            k_ptr + b * skb + hk * skh + cols[:, None] * skl + offs_d[None, :] * skd,
            mask=vis[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        if HAS_KEEP:
            kp = tl.load(keep_ptr + b * seb + hk * seh + cols * sel, mask=vis, other=0)
            vis = vis & (kp != 0)
        rows = b * Hk * G + hk * G + offs_g
        lse = tl.load(lse_ptr + rows, mask=gmask, other=float("inf"))
        p = tl.where(vis[None, :], tl.exp(s * scale - lse[:, None]), 0.0)
        tl.store(p_ptr + rows[:, None] * L + cols[None, :], p, mask=gmask[:, None] & (cols[None, :] < L))


def _decode_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
    return_probs: bool, keep: torch.Tensor | None, num_splits: int | None = None, block_l: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    B, H, D = q.shape
    Hk, L, DV = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    dev = q.device
    if B * H == 0 or L == 0:
        probs = torch.zeros(B, H, L, dtype=torch.float32, device=dev) if return_probs else None
        return torch.zeros(B, H, DV, dtype=q.dtype, device=dev), probs
    lengths = lengths.to(device=dev, dtype=torch.int64)
    keep_t = lengths if keep is None else keep.to(device=dev, dtype=torch.bool).view(torch.uint8)
    keep_strides = (0, 0, 0) if keep is None else tuple(keep_t.stride())
    n_blocks = triton.cdiv(L, block_l)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 1
        num_splits = triton.cdiv(2 * sms, B * Hk)
    S = max(1, min(int(num_splits), n_blocks))
    chunk = triton.cdiv(n_blocks, S) * block_l
    m = torch.empty(B, H, S, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m)
    acc = torch.empty(B, H, S, DV, dtype=torch.float32, device=dev)
    f32 = use_f32_dot(q.dtype, _decode_partial_kernel)
    block_g, block_d = max(16, next_pow2(G)), max(16, next_pow2(D))
    _decode_partial_kernel[(B * Hk, S)](
        q, k, v, lengths, keep_t, m, l_part, acc,
        *q.stride(), *k.stride(), *v.stride(), *lengths.stride(), *keep_strides,
        Hk, G, L, D, DV, S, chunk, float(scale),
        HAS_KEEP=keep is not None, DOT_F32=f32, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d,
        BLOCK_DV=max(16, next_pow2(DV)),
    )  # fmt: skip
    m_max = m.amax(dim=-1, keepdim=True)
    m_max = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    w = torch.exp(m - m_max)  # splits that saw nothing have m = -inf -> weight 0
    l_tot = (l_part * w).sum(dim=-1)
    out = (acc * w[..., None]).sum(dim=-2) / l_tot.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    if not return_probs:
        return out.to(q.dtype), None
    lse = torch.where(
        l_tot > 0,
        m_max.squeeze(-1) + torch.log(l_tot.clamp_min(torch.finfo(torch.float32).tiny)),
        float("inf"),
    )
    probs = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    _decode_probs_kernel[(B * Hk, n_blocks)](
        q, k, lengths, keep_t, lse.contiguous(), probs,
        *q.stride(), *k.stride(), *lengths.stride(), *keep_strides, Hk, G, L, D, float(scale),
        HAS_KEEP=keep is not None, DOT_F32=f32, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d,
    )  # fmt: skip
    return out.to(q.dtype), probs


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    return_probs: bool = False,
    keep: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one decode query per head over a padded GQA KV cache.

    Query head ``h`` attends to KV head ``h // G`` (``G = H // Hk``; K/V are never repeated). The softmax
    of ``scale * q·k_j`` is taken in fp32 over the entries ``j < lengths[b, hk]`` with
    ``keep[b, hk, j]`` true; the weighted sum of values is accumulated in fp32.

    Parameters
    ----------
    q
        Queries ``[B, H, d]`` (fp32, fp16 or bf16).
    k, v
        Padded caches ``[B, Hk, L, d]`` and ``[B, Hk, L, dv]`` in ``q``'s dtype. Entries at index
        ``>= lengths`` (or with ``keep`` false) are ignored and may hold garbage, even NaN.
    lengths
        Valid length per (batch, KV head), integer ``[B, Hk]``.
    scale
        Multiplier of the dot products (usually ``d ** -0.5``).
    return_probs
        Also return the attention probabilities.
    keep
        Optional bool mask ``[B, Hk, L]``; only entries with ``keep=True`` are attended.
    impl
        ``"auto"`` (Triton for CUDA inputs when available, else torch), ``"torch"`` or ``"triton"``.

    Returns
    -------
    out : torch.Tensor
        ``[B, H, dv]`` in ``q``'s dtype. A row with no visible entry (length 0 or nothing kept) gets
        zeros.
    probs : torch.Tensor or None
        fp32 ``[B, H, L]`` probabilities (exactly 0 on invisible entries, all-zero rows when nothing is
        visible) when ``return_probs``, else ``None``.
    """
    if q.dim() != 3 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"bad ranks: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    B, H, D = q.shape
    Hk, L = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3] or Hk == 0 or H % Hk != 0:
        raise ValueError(f"incompatible q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_lengths(lengths, B, Hk)
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (B, Hk, L)):
        raise ValueError(
            f"keep must be a bool tensor of shape {[B, Hk, L]}, got {keep.dtype} {list(keep.shape)}"
        )
    which = resolve_impl(impl, (q, k, v), _decode_partial_kernel if HAS_TRITON else None)
    if which == "triton":
        return _decode_attention_triton(q, k, v, lengths, scale, return_probs, keep)
    return _decode_attention_torch(q, k, v, lengths, scale, return_probs, keep)
