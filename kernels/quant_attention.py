"""Decode attention over a two-segment KV cache: a full-precision segment and a quantized segment.

The quantized segment stores per-token round-to-nearest codes of ``bits`` in 1, 2, 4, 8 (planar packing of
:mod:`mpckv.plaintext.storage.quant`: byte ``j`` of a row holds channels ``j, M + j, …``), a scale and a
zero per group of ``group`` channels (``x̂ = s·c + z``; symmetric: ``z = −s·2^{b−1}``) and, for keys, an
optional per-channel balancer ``b`` (MiKV): the stored codes quantize ``k ⊙ b``, so the score uses
``q ⊘ b``. One softmax runs over both segments (the log-sum-exp of the two parts is merged).

* torch path: the scale is folded into the dot product, ``q·(s·c + z) = s·(q·c) + z·Σq`` per group, and
  the values likewise ``Σ_t p_t(s_t·c_t + z_t) = (p ⊙ s)·C + p·z``; the planes are widened to fp32 in
  channel order (no interleaving, no full dequantized copy when there is one group per head). 4 bits with one
  group: no mask either — the byte ``lo + 16·hi`` and its high nibble are widened and the low nibble is
  folded into the other operand (``q_lo·byte + (q_hi − 16·q_lo)·hi``; values ``w·byte − 16·w·hi``).
* Triton path: flash-decoding over the quantized segment, dequantizing each ``[BLOCK_L, d]`` tile in
  registers from the packed bytes; the full-precision segment's partial softmax is computed in torch and
  merged. Probabilities (when asked) are recomputed from the merged log-sum-exp in torch.
* :func:`dequantize_segment` is the reference (used by the tests and by ``keys()`` / ``values()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import HAS_TRITON, Impl, next_pow2, resolve_impl, tl, triton

__all__ = [
    "HAS_TRITON",
    "QuantSegment",
    "dequantize_segment",
    "merge_two_segments",
    "planar_planes",
    "quant_attention",
    "segment_scores",
    "segment_weighted",
]


@dataclass
class QuantSegment:
    """Per-token quantized rows ``[B, Hk, L, ·]`` (see the module docstring)."""

    codes: torch.Tensor  # uint8 [B, Hk, L, packed_size(d, bits)]
    scale: torch.Tensor  # [B, Hk, L, ng]
    zero: torch.Tensor | None  # [B, Hk, L, ng]; None = symmetric
    bits: int
    group: int
    dim: int
    balance: torch.Tensor | None = None  # [B, Hk, d]: stored rows are x ⊙ balance

    @property
    def planes(self) -> int:
        return 8 // self.bits

    @property
    def plane_width(self) -> int:
        return self.codes.shape[-1]

    def zero_f32(self) -> torch.Tensor:
        if self.zero is not None:
            return self.zero.float()
        return -self.scale.float() * float(1 << (self.bits - 1))


def _check(seg: QuantSegment) -> None:
    if seg.bits not in (1, 2, 4, 8):
        raise ValueError(f"quant_attention supports planar bit widths 1, 2, 4, 8, got {seg.bits}")
    if seg.dim % seg.group:
        raise ValueError(f"group {seg.group} must divide the head dimension {seg.dim}")


def planar_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar bytes ``[..., M]`` → uint8 codes ``[..., 8 / bits, M]`` (plane ``i``: channels
    ``[iM, (i+1)M)``), one shift and one mask per plane, stacked. Shifts and masks are 0-dim uint8 tensors: a
    Python-int ``&`` takes a ~50x slower promoting path on CPU, a broadcast ``[k, 1]`` shift a ~3x slower
    one."""
    k = 8 // bits
    if k == 1:
        return codes[..., None, :]
    dev = codes.device
    mask = torch.tensor((1 << bits) - 1, dtype=torch.uint8, device=dev)
    planes = [torch.bitwise_and(codes, mask)]
    for i in range(1, k):
        shifted = torch.bitwise_right_shift(codes, torch.tensor(bits * i, dtype=torch.uint8, device=dev))
        planes.append(shifted if i == k - 1 else torch.bitwise_and(shifted, mask))
    return torch.stack(planes, dim=-2)


def _codes_f32(seg: QuantSegment) -> torch.Tensor:
    """All codes widened to fp32 ``[B, Hk, L, d]`` (the planes stacked in channel order, one conversion)."""
    b, hk, n, m = seg.codes.shape
    codes = seg.codes.contiguous()  # a live slice of a store with spare capacity: strided ops are slow
    if seg.planes == 1:
        return codes[..., : seg.dim].float()
    return planar_planes(codes, seg.bits).view(b, hk, n, seg.planes * m)[..., : seg.dim].float()


def _nibble_operands(seg: QuantSegment) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit planar bytes as two fp32 operands ``[B, Hk, L, M]``: the byte (``lo + 16·hi``) and its high
    nibble. Two conversions and one shift, no mask and no interleave; the low nibble is folded into the
    other operand of the product (``lo = byte − 16·hi``)."""
    codes = seg.codes.contiguous()  # a live slice of a store with spare capacity: strided ops are slow
    four = torch.tensor(4, dtype=torch.uint8, device=codes.device)
    return codes.float(), torch.bitwise_right_shift(codes, four).float()


def dequantize_segment(seg: QuantSegment) -> torch.Tensor:
    """Reference dequantization ``[B, Hk, L, d]`` fp32 (the balancer undone)."""
    _check(seg)
    c = _codes_f32(seg).unflatten(-1, (seg.dim // seg.group, seg.group))
    x = (c * seg.scale.float()[..., None] + seg.zero_f32()[..., None]).flatten(-2)
    if seg.balance is not None:
        x = x / seg.balance.float()[:, :, None, :]
    return x


def segment_scores(qg: torch.Tensor, seg: QuantSegment) -> torch.Tensor:
    """``q·k̂`` for ``qg [B, Hk, G, d]`` (fp32) → ``[B, Hk, G, L]`` with the scale folded in."""
    if seg.balance is not None:
        qg = qg / seg.balance.float()[:, :, None, :]
    s, z = seg.scale.float(), seg.zero_f32()  # [B, Hk, L, ng]
    ng = seg.dim // seg.group
    if ng == 1 and seg.bits == 4:  # nibbles: q·c = q_lo·byte + (q_hi − 16·q_lo)·(byte >> 4), no mask
        byte, high = _nibble_operands(seg)
        m = seg.plane_width
        q_lo, q_hi = qg[..., :m], torch.nn.functional.pad(qg[..., m:], (0, 2 * m - seg.dim))
        raw = q_lo @ byte.transpose(-1, -2) + (q_hi - 16.0 * q_lo) @ high.transpose(-1, -2)
        return raw * s[..., 0][:, :, None, :] + qg.sum(-1, keepdim=True) * z[..., 0][:, :, None, :]
    if ng == 1:  # one group per row: one GEMM on the raw codes, then one scale and one shift per row
        raw = qg @ _codes_f32(seg).transpose(-1, -2)
        return raw * s[..., 0][:, :, None, :] + qg.sum(-1, keepdim=True) * z[..., 0][:, :, None, :]
    c = _codes_f32(seg).unflatten(-1, (ng, seg.group)).transpose(2, 3)  # [B, Hk, ng, L, Gd]
    qn = qg.unflatten(-1, (ng, seg.group)).transpose(2, 3)  # [B, Hk, ng, G, Gd]
    raw = qn @ c.transpose(-1, -2)  # [B, Hk, ng, G, L]
    qsum = qn.sum(-1)  # [B, Hk, ng, G]
    out = (raw * s.permute(0, 1, 3, 2)[:, :, :, None, :]).sum(2)
    return out + (qsum.transpose(2, 3) @ z.transpose(-1, -2))  # [B, Hk, G, ng] @ [B, Hk, ng, L]


def segment_weighted(p: torch.Tensor, seg: QuantSegment) -> torch.Tensor:
    """``Σ_t p_t·v̂_t`` for ``p [B, Hk, G, L]`` (fp32) → ``[B, Hk, G, d]``."""
    s, z = seg.scale.float(), seg.zero_f32()
    ng = seg.dim // seg.group
    pz = p @ z  # [B, Hk, G, ng]
    if ng == 1 and seg.bits == 4:  # Σ w·c_lo = w·byte − 16·(w·(byte >> 4)), Σ w·c_hi = w·(byte >> 4)
        byte, high = _nibble_operands(seg)
        w = p * s[..., 0][:, :, None, :]
        wh = w @ high
        out = torch.cat([w @ byte - 16.0 * wh, wh[..., : seg.dim - seg.plane_width]], dim=-1) + pz
    elif ng == 1:
        out = (p * s[..., 0][:, :, None, :]) @ _codes_f32(seg) + pz
    else:
        c = _codes_f32(seg).unflatten(-1, (ng, seg.group)).transpose(2, 3)  # [B, Hk, ng, L, Gd]
        ps = p[:, :, None] * s.permute(0, 1, 3, 2)[:, :, :, None, :]  # [B, Hk, ng, G, L]
        out = (ps @ c).transpose(2, 3).flatten(-2) + pz.repeat_interleave(seg.group, dim=-1)
    if seg.balance is not None:
        out = out / seg.balance.float()[:, :, None, :]
    return out


def merge_two_segments(
    l_hi: torch.Tensor,
    v_hi: torch.Tensor,
    l_lo: torch.Tensor,
    weighted_lo,
    return_probs: bool,
    *,
    all_visible_hi: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One softmax over masked logits ``l_hi [B, Hk, G, Lh]`` and ``l_lo [B, Hk, G, Ll]`` (``-inf`` =
    hidden). ``weighted_lo(p_lo) -> [B, Hk, G, d]``. Returns ``out [B, Hk, G, d]`` and the two probability
    blocks when asked (rows with nothing visible give zeros). ``all_visible_hi``: the caller knows every
    ``v_hi`` row is live (nothing to clear, so no masked copy of ``v_hi``)."""
    m = torch.maximum(l_hi.amax(-1, keepdim=True), l_lo.amax(-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e_hi, e_lo = torch.exp(l_hi - m), torch.exp(l_lo - m)
    denom = (e_hi.sum(-1, keepdim=True) + e_lo.sum(-1, keepdim=True)).clamp_min(
        torch.finfo(torch.float32).tiny
    )
    tiny = torch.finfo(torch.float32).tiny
    # subnormal probabilities (< 1.2e-38, far below what the fp32 output resolves) are flushed to 0: every
    # later multiply that meets one takes a microcode assist on x86 (several times slower per op)
    p_hi, p_lo = e_hi / denom, e_lo / denom
    p_hi, p_lo = p_hi.masked_fill(p_hi < tiny, 0.0), p_lo.masked_fill(p_lo < tiny, 0.0)
    if all_visible_hi:
        out = p_hi @ v_hi.float() + weighted_lo(p_lo)
    else:
        vis_hi = torch.isfinite(l_hi).any(2)[..., None]  # [B, Hk, Lh, 1]: garbage rows never reach out
        out = p_hi @ torch.where(vis_hi, v_hi.float(), 0.0) + weighted_lo(p_lo)
    if not return_probs:
        return out, None, None
    return out, p_hi, p_lo


def _visible(lengths: torch.Tensor, keep: torch.Tensor | None, n: int) -> torch.Tensor:
    mask = torch.arange(n, device=lengths.device)[None, None, :] < lengths[..., None]
    return mask if keep is None else mask & keep


def _all_visible(lengths: torch.Tensor, keep: torch.Tensor | None, n: int) -> bool:
    return keep is None and (lengths.numel() == 0 or int(lengths.min()) >= n)


def _attention_torch(q, k_hi, v_hi, len_hi, seg_k, seg_v, len_lo, scale, keep_hi, keep_lo, return_probs):
    b, h, d = q.shape
    hk = k_hi.shape[1]
    qg = q.float().view(b, hk, h // hk, d)
    l_hi = (qg @ k_hi.float().transpose(-1, -2)) * scale
    full_hi = _all_visible(len_hi, keep_hi, k_hi.shape[2])
    if not full_hi:
        l_hi = l_hi.masked_fill(~_visible(len_hi, keep_hi, k_hi.shape[2])[:, :, None, :], float("-inf"))
    l_lo = segment_scores(qg, seg_k) * scale
    if not _all_visible(len_lo, keep_lo, seg_k.codes.shape[2]):
        l_lo = l_lo.masked_fill(
            ~_visible(len_lo, keep_lo, seg_k.codes.shape[2])[:, :, None, :], float("-inf")
        )
    out, p_hi, p_lo = merge_two_segments(
        l_hi, v_hi, l_lo, lambda p: segment_weighted(p, seg_v), return_probs, all_visible_hi=full_hi
    )
    return out, p_hi, p_lo


if HAS_TRITON:

    @triton.jit
    def _quant_partial_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, keep_ptr, m_ptr, l_ptr, acc_ptr,
        skb, skh, skl, sgb, sgh, sgl, svb, svh, svl, shb, shh, shl, seb, seh, sel,
        Hk, G, L, D, M, GROUP, S, chunk, scale, half,
        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_KEEP: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # q: contiguous fp32 [B, Hk*G, D] (already divided by the balancer); codes/scales: strided
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        b = pid // Hk
        hk = pid % Hk
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_l = tl.arange(0, BLOCK_L)
        gmask = offs_g < G
        dmask = offs_d < D
        q = tl.load(
            q_ptr + (b * Hk * G + hk * G + offs_g)[:, None] * D + offs_d[None, :],
            mask=gmask[:, None] & dmask[None, :],
            other=0.0,
        )
        byte = offs_d % M
        shift = (offs_d // M) * BITS
        grp = offs_d // GROUP
        cmask_bits = (1 << BITS) - 1
        length = tl.minimum(tl.load(len_ptr + b * shb + hk * shh), L)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_L):
            cols = start + offs_l
            cm = cols < hi
            tmask = cm[:, None] & dmask[None, :]
            kb = tl.load(
                kc_ptr + b * skb + hk * skh + cols[:, None] * skl + byte[None, :], mask=tmask, other=0
            )
            kcode = ((kb.to(tl.int32) >> shift[None, :]) & cmask_bits).to(tl.float32)
            sk = tl.load(
                ks_ptr + b * sgb + hk * sgh + cols[:, None] * sgl + grp[None, :], mask=tmask, other=0.0
            )
            if HAS_ZERO:
                zk = tl.load(
                    kz_ptr + b * sgb + hk * sgh + cols[:, None] * sgl + grp[None, :], mask=tmask, other=0.0
                )
            else:
                zk = -sk * half
            kt = kcode * sk + zk
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            vis = cm
            if HAS_KEEP:
                kp = tl.load(keep_ptr + b * seb + hk * seh + cols * sel, mask=cm, other=0)
                vis = vis & (kp != 0)
            s = tl.where(vis[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            vmask = vis[:, None] & dmask[None, :]
            vb = tl.load(
                vc_ptr + b * svb + hk * svh + cols[:, None] * svl + byte[None, :], mask=vmask, other=0
            )
            vcode = ((vb.to(tl.int32) >> shift[None, :]) & cmask_bits).to(tl.float32)
            sv = tl.load(
                vs_ptr + b * sgb + hk * sgh + cols[:, None] * sgl + grp[None, :], mask=vmask, other=0.0
            )
            if HAS_ZERO:
                zv = tl.load(
                    vz_ptr + b * sgb + hk * sgh + cols[:, None] * sgl + grp[None, :], mask=vmask, other=0.0
                )
            else:
                zv = -sv * half
            vt = tl.where(vmask, vcode * sv + zv, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        row = (b * Hk * G + hk * G + offs_g) * S + split
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


def _attention_triton(
    q, k_hi, v_hi, len_hi, seg_k, seg_v, len_lo, scale, keep_hi, keep_lo, return_probs, num_splits=None,
    block_l=32,
):  # fmt: skip
    b, h, d = q.shape
    hk = k_hi.shape[1]
    g = h // hk
    dev = q.device
    qg = q.float().view(b, hk, g, d)
    qb = qg / seg_k.balance.float()[:, :, None, :] if seg_k.balance is not None else qg
    L = seg_k.codes.shape[2]
    if seg_k.scale.stride() != seg_v.scale.stride() or (
        seg_k.zero is not None and seg_v.zero is not None and seg_k.zero.stride() != seg_k.scale.stride()
    ):
        raise ValueError("key and value segments must share the scale layout")
    n_blocks = max(1, triton.cdiv(L, block_l))
    if num_splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 1
        num_splits = triton.cdiv(2 * sms, b * hk)
    S = max(1, min(int(num_splits), n_blocks))
    chunk = triton.cdiv(n_blocks, S) * block_l
    m = torch.empty(b, h, S, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m)
    acc = torch.empty(b, h, S, d, dtype=torch.float32, device=dev)
    len_lo = len_lo.to(device=dev, dtype=torch.int64)
    keep_t = len_lo if keep_lo is None else keep_lo.to(torch.bool).view(torch.uint8)
    keep_strides = (0, 0, 0) if keep_lo is None else tuple(keep_t.stride())
    kz = seg_k.zero if seg_k.zero is not None else seg_k.scale
    vz = seg_v.zero if seg_v.zero is not None else seg_v.scale
    if seg_k.codes.stride() != seg_v.codes.stride():
        raise ValueError("key and value segments must share the code layout")
    _quant_partial_kernel[(b * hk, S)](
        qb.contiguous(), seg_k.codes, seg_k.scale, kz, seg_v.codes, seg_v.scale, vz, len_lo, keep_t,
        m, l_part, acc,
        *seg_k.codes.stride()[:3], *seg_k.scale.stride()[:3], *seg_v.codes.stride()[:3], *len_lo.stride(), 0,
        *keep_strides,
        hk, g, L, d, seg_k.plane_width, seg_k.group, S, chunk, float(scale), float(1 << (seg_k.bits - 1)),
        BITS=seg_k.bits, HAS_ZERO=seg_k.zero is not None, HAS_KEEP=keep_lo is not None,
        BLOCK_G=max(16, next_pow2(g)), BLOCK_L=block_l, BLOCK_D=max(16, next_pow2(d)),
    )  # fmt: skip
    # full-precision segment in torch, merged by log-sum-exp
    l_hi = (qg @ k_hi.float().transpose(-1, -2)) * scale
    l_hi = l_hi.masked_fill(~_visible(len_hi, keep_hi, k_hi.shape[2])[:, :, None, :], float("-inf"))
    m_hi = l_hi.amax(-1)  # [B, Hk, G]
    m_hi_s = torch.where(torch.isfinite(m_hi), m_hi, torch.zeros_like(m_hi))
    e_hi = torch.exp(l_hi - m_hi_s[..., None])
    vis_hi = torch.isfinite(l_hi).any(2)[..., None]  # [B, Hk, Lh, 1]
    acc_hi = e_hi @ torch.where(vis_hi, v_hi.float(), 0.0)  # [B, Hk, G, d]
    ms = torch.cat([m.view(b, hk, g, S), m_hi[..., None]], dim=-1)
    ls = torch.cat([l_part.view(b, hk, g, S), e_hi.sum(-1)[..., None]], dim=-1)
    accs = torch.cat([acc.view(b, hk, g, S, d), acc_hi[:, :, :, None]], dim=-2)
    mm = ms.amax(-1, keepdim=True)
    mm = torch.where(torch.isfinite(mm), mm, torch.zeros_like(mm))
    ms_s = torch.where(torch.isfinite(ms), ms, torch.full_like(ms, float("-inf")))
    w = torch.exp(ms_s - mm)
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    tot = (ls * w).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    out = (accs * w[..., None]).sum(-2) / tot[..., None]
    if not return_probs:
        return out, None, None
    lse = mm[..., 0] + torch.log(tot)
    l_lo = segment_scores(qg, seg_k) * scale
    l_lo = l_lo.masked_fill(~_visible(len_lo, keep_lo, L)[:, :, None, :], float("-inf"))
    return out, torch.exp(l_hi - lse[..., None]), torch.exp(l_lo - lse[..., None])


def quant_attention(
    q: torch.Tensor,
    k_hi: torch.Tensor,
    v_hi: torch.Tensor,
    len_hi: torch.Tensor,
    seg_k: QuantSegment,
    seg_v: QuantSegment,
    len_lo: torch.Tensor,
    *,
    scale: float,
    keep_hi: torch.Tensor | None = None,
    keep_lo: torch.Tensor | None = None,
    return_probs: bool = False,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Decode attention of ``q [B, H, d]`` over a full-precision segment ``k_hi, v_hi [B, Hk, Lh, d]``
    (``len_hi [B, Hk]`` live) and a quantized segment ``seg_k, seg_v`` (``len_lo [B, Hk]`` live).

    Returns ``out [B, H, d]`` (``q``'s dtype) and, with ``return_probs``, fp32 probabilities
    ``[B, H, Lh]`` and ``[B, H, Ll]`` of one softmax over both segments (0 on hidden entries).
    ``keep_hi`` / ``keep_lo`` (bool, per segment) restrict the attended entries. ``impl``: ``"auto"``
    (Triton on CUDA), ``"torch"`` or ``"triton"``.
    """
    if q.dim() != 3 or k_hi.dim() != 4 or v_hi.shape != k_hi.shape:
        raise ValueError(f"bad shapes: q {list(q.shape)}, k_hi {list(k_hi.shape)}, v_hi {list(v_hi.shape)}")
    b, h, d = q.shape
    hk = k_hi.shape[1]
    if hk == 0 or h % hk or k_hi.shape[0] != b or k_hi.shape[3] != d:
        raise ValueError(f"incompatible q {list(q.shape)} and k_hi {list(k_hi.shape)}")
    for seg in (seg_k, seg_v):
        _check(seg)
        if seg.dim != d or seg.codes.shape[:2] != (b, hk) or seg.codes.dtype != torch.uint8:
            raise ValueError(f"segment codes {list(seg.codes.shape)} do not match q {list(q.shape)}")
    if seg_v.balance is not None:
        raise ValueError("the value segment takes no balancer")
    if (seg_k.bits, seg_k.group, seg_k.zero is None) != (seg_v.bits, seg_v.group, seg_v.zero is None):
        raise ValueError("key and value segments must share bits, group and symmetry")
    which = resolve_impl(impl, (q, seg_k.codes), _quant_partial_kernel if HAS_TRITON else None)
    fn = _attention_triton if which == "triton" else _attention_torch
    out, p_hi, p_lo = fn(q, k_hi, v_hi, len_hi, seg_k, seg_v, len_lo, scale, keep_hi, keep_lo, return_probs)
    out = out.reshape(b, h, d).to(q.dtype)
    if p_hi is None or p_lo is None:
        return out, None, None
    return out, p_hi.reshape(b, h, -1), p_lo.reshape(b, h, -1)
