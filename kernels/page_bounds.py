"""Quest-style page metadata: per-page channel-wise key min/max and query-aware attention upper bounds.

The key cache is cut into pages of ``page_size`` consecutive cache entries. For a page with
channel-wise bounds ``kmin <= k_t <= kmax`` the score of any of its keys satisfies
``q·k_t <= sum_i max(q_i * kmax_i, q_i * kmin_i) = relu(q)·kmax + min(q, 0)·kmin``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
)

__all__ = [
    "HAS_TRITON",
    "grow_page_bounds",
    "num_valid_pages",
    "page_minmax",
    "page_upper_bound",
    "update_page_minmax",
    "widen_page_bounds_",
]

_PAGE_CHUNK = 16  # spare pages added (at least) when bound buffers grow


def num_valid_pages(lengths: torch.Tensor, page_size: int) -> torch.Tensor:
    """Number of pages holding a valid entry, ``ceil(max(lengths, 0) / page_size)``, as int64 ``[B, Hk]``.

    Parameters
    ----------
    lengths
        Valid lengths ``[B, Hk]`` (integer).
    page_size
        Entries per page.
    """
    return (lengths.to(torch.int64).clamp_min(0) + page_size - 1) // page_size


def _page_minmax_torch(
    k: torch.Tensor, lengths: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hk, L, D = k.shape
    P = -(-L // page_size)
    valid = (torch.arange(L, device=k.device).view(1, 1, L) < lengths.to(k.device).view(B, Hk, 1))[..., None]
    kf = k.float()
    pad = (0, 0, 0, P * page_size - L)
    kmin = F.pad(torch.where(valid, kf, float("inf")), pad, value=float("inf"))
    kmax = F.pad(torch.where(valid, kf, float("-inf")), pad, value=float("-inf"))
    return kmin.view(B, Hk, P, page_size, D).amin(dim=3), kmax.view(B, Hk, P, page_size, D).amax(dim=3)


def _page_upper_bound_torch(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid_pages: torch.Tensor, group_reduce: str
) -> torch.Tensor:
    B, H, D = q.shape
    Hk, P = kmin.shape[1], kmin.shape[2]
    qf = q.float().view(B, Hk, H // Hk, D)
    pages = torch.arange(P, device=kmin.device).view(1, 1, P)
    valid = (pages < n_valid_pages.to(kmin.device).view(B, Hk, 1)) & ~(kmin > kmax).any(dim=-1)
    kmin0 = torch.where(valid[..., None], kmin.float(), 0.0)
    kmax0 = torch.where(valid[..., None], kmax.float(), 0.0)
    u = qf.clamp_min(0) @ kmax0.transpose(-1, -2) + qf.clamp_max(0) @ kmin0.transpose(-1, -2)  # [B,Hk,G,P]
    u = reduce_groups(u, group_reduce, dim=2)
    return u.masked_fill(~valid, float("-inf"))


if HAS_TRITON:

    @triton.jit
    def _page_minmax_kernel(
        k_ptr, len_ptr, kmin_ptr, kmax_ptr,
        skb, skh, skl, skd, slb, slh,
        Hk, L, D, P, page_size,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        page = tl.program_id(1)
        b = pid // Hk
        hk = pid % Hk
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_T)
        length = tl.minimum(tl.load(len_ptr + b * slb + hk * slh), L)
        first = page * page_size
        hi = tl.minimum(page_size, length - first)
        lo_acc = tl.full([BLOCK_D], float("inf"), tl.float32)
        hi_acc = tl.full([BLOCK_D], float("-inf"), tl.float32)
        for t0 in range(0, hi, BLOCK_T):
            t = t0 + offs_t
            m = (t[:, None] < hi) & (offs_d[None, :] < D)
            x = tl.load(
                k_ptr + b * skb + hk * skh + (first + t)[:, None] * skl + offs_d[None, :] * skd, mask=m
            )
            x = x.to(tl.float32)
            lo_acc = tl.minimum(lo_acc, tl.min(tl.where(m, x, float("inf")), axis=0))
            hi_acc = tl.maximum(hi_acc, tl.max(tl.where(m, x, float("-inf")), axis=0))
        out = (pid * P + page) * D + offs_d
        tl.store(kmin_ptr + out, lo_acc, mask=offs_d < D)
        tl.store(kmax_ptr + out, hi_acc, mask=offs_d < D)

    @triton.jit
    def _page_bound_kernel(
        q_ptr, kmin_ptr, kmax_ptr, nv_ptr, out_ptr,
        sqb, sqh, sqd, smb, smh, smp, smd, sxb, sxh, sxp, sxd, snb, snh,
        Hk, G, D, P,
        REDUCE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        b = pid // Hk
        hk = pid % Hk
        pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        m = (pages[:, None] < P) & (offs_d[None, :] < D)
        lo = tl.load(
            kmin_ptr + b * smb + hk * smh + pages[:, None] * smp + offs_d[None, :] * smd, mask=m, other=0.0
        )
        up = tl.load(
            kmax_ptr + b * sxb + hk * sxh + pages[:, None] * sxp + offs_d[None, :] * sxd, mask=m, other=0.0
        )
        empty = tl.max(tl.where(m & (lo > up), 1, 0), axis=1) > 0
        n_valid = tl.load(nv_ptr + b * snb + hk * snh)
        valid = (pages < n_valid) & (pages < P) & (empty == 0)
        lo = tl.where(valid[:, None], lo, 0.0)
        up = tl.where(valid[:, None], up, 0.0)
        if REDUCE == 2:
            res = tl.full([BLOCK_P], float("-inf"), tl.float32)
        else:
            res = tl.zeros([BLOCK_P], tl.float32)
        for g in range(0, G):
            qv = tl.load(q_ptr + b * sqb + (hk * G + g) * sqh + offs_d * sqd, mask=offs_d < D, other=0.0)
            qv = qv.to(tl.float32)[None, :]
            u = tl.sum(tl.maximum(qv * up, qv * lo), axis=1)
            if REDUCE == 2:
                res = tl.maximum(res, u)
            else:
                res += u
        if REDUCE == 0:
            res = res / G
        res = tl.where(valid, res, float("-inf"))
        tl.store(out_ptr + pid * P + pages, res, mask=pages < P)


def page_minmax(
    k: torch.Tensor, lengths: torch.Tensor, page_size: int, impl: Impl = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of the valid keys of every page.

    Parameters
    ----------
    k
        Padded key cache ``[B, Hk, L, d]`` (any floating dtype); entries at index ``>= lengths`` are
        ignored.
    lengths
        Valid length per (batch, KV head), integer ``[B, Hk]``.
    page_size
        Number of consecutive cache entries per page (``>= 1``).
    impl
        ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns
    -------
    kmin, kmax : torch.Tensor
        fp32 tensors ``[B, Hk, n_pages, d]`` with ``n_pages = ceil(L / page_size)``. Pages without any
        valid entry hold ``kmin = +inf`` and ``kmax = -inf``.
    """
    if k.dim() != 4 or not k.dtype.is_floating_point:
        raise ValueError(f"k must be a floating [B, Hk, L, d] tensor, got {k.dtype} {list(k.shape)}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    B, Hk, L, D = k.shape
    check_lengths(lengths, B, Hk)
    which = resolve_impl(impl, (k,), _page_minmax_kernel if HAS_TRITON else None)
    if which == "torch":
        return _page_minmax_torch(k, lengths, page_size)
    P = -(-L // page_size)
    kmin = torch.empty(B, Hk, P, D, dtype=torch.float32, device=k.device)
    kmax = torch.empty_like(kmin)
    if kmin.numel() == 0:
        return kmin, kmax
    lengths = lengths.to(device=k.device, dtype=torch.int64)
    block_d = next_pow2(D)
    block_t = max(1, min(next_pow2(page_size), max(1, 4096 // block_d)))
    _page_minmax_kernel[(B * Hk, P)](
        k, lengths, kmin, kmax, *k.stride(), *lengths.stride(), Hk, L, D, P, page_size,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return kmin, kmax


def page_upper_bound(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    n_valid_pages: torch.Tensor,
    group_reduce: GroupReduce = "max",
    impl: Impl = "auto",
) -> torch.Tensor:
    """Quest upper bound of the (unscaled) attention logit of each page for one decode query.

    Per query head ``u[p] = sum_i max(q_i * kmax[p, i], q_i * kmin[p, i])``, an upper bound of ``q·k_t``
    for every key ``t`` of page ``p``; it is then reduced over the ``G`` query heads of each KV head.

    Parameters
    ----------
    q
        Decode queries ``[B, H, d]``, ``H = Hk * G``.
    kmin, kmax
        Page bounds ``[B, Hk, n_pages, d]`` as returned by :func:`page_minmax`.
    n_valid_pages
        Number of leading valid pages per (batch, KV head), integer ``[B, Hk]``
        (see :func:`num_valid_pages`).
    group_reduce
        ``"max"`` (default: a bound valid for every head of the group), ``"mean"`` or ``"sum"``.
    impl
        ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns
    -------
    torch.Tensor
        fp32 ``[B, Hk, n_pages]``; pages ``>= n_valid_pages`` and empty pages (``kmin > kmax``) get
        ``-inf``.
    """
    if q.dim() != 3 or kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise ValueError(f"bad shapes q {list(q.shape)}, kmin {list(kmin.shape)}, kmax {list(kmax.shape)}")
    B, H, D = q.shape
    Hk, P = kmin.shape[1], kmin.shape[2]
    if kmin.shape[0] != B or kmin.shape[3] != D or Hk == 0 or H % Hk != 0:
        raise ValueError(f"incompatible q {list(q.shape)} and page bounds {list(kmin.shape)}")
    check_lengths(n_valid_pages, B, Hk, name="n_valid_pages")
    code = check_group_reduce(group_reduce)
    which = resolve_impl(impl, (q, kmin, kmax), _page_bound_kernel if HAS_TRITON else None)
    if which == "torch":
        return _page_upper_bound_torch(q, kmin, kmax, n_valid_pages, group_reduce)
    out = torch.empty(B, Hk, P, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    nv = n_valid_pages.to(device=q.device, dtype=torch.int64)
    block_d = next_pow2(D)
    block_p = max(1, min(64, next_pow2(P), max(1, 4096 // block_d)))
    _page_bound_kernel[(B * Hk, triton.cdiv(P, block_p))](
        q, kmin, kmax, nv, out, *q.stride(), *kmin.stride(), *kmax.stride(), *nv.stride(), Hk, H // Hk, D, P,
        REDUCE=code, BLOCK_P=block_p, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def update_page_minmax(
    kmin: torch.Tensor, kmax: torch.Tensor, k_new: torch.Tensor, index: torch.Tensor, *, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Incrementally update page bounds after appending one key per (batch, KV head) (torch only).

    Parameters
    ----------
    kmin, kmax
        Current bounds ``[B, Hk, n_pages, d]`` (fp32), consistent with the keys before the append.
    k_new
        The appended keys ``[B, Hk, d]`` (or ``[B, Hk, 1, d]``).
    index
        Cache index at which each key was written, integer ``[B, Hk]``; negative means "nothing
        appended" for that (batch, KV head). The update is exact for appends (``index`` equal to the
        previous length); overwriting an existing entry can only widen the bounds.
    page_size
        Entries per page.

    Returns
    -------
    kmin, kmax : torch.Tensor
        New fp32 tensors (inputs are not modified). When an index falls past the last page, the page
        dimension grows to ``max(index) // page_size + 1`` (new pages start empty: ``+inf`` / ``-inf``).
    """
    if kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise ValueError(
            f"kmin/kmax must be equal-shaped 4-D tensors, got {list(kmin.shape)}, {list(kmax.shape)}"
        )
    B, Hk, P, D = kmin.shape
    k_new = k_new.reshape(B, Hk, 1, D).to(device=kmin.device, dtype=torch.float32)
    check_lengths(index, B, Hk, name="index")
    index = index.to(device=kmin.device, dtype=torch.int64)
    active = (index >= 0).view(B, Hk, 1, 1)
    page = torch.where(index >= 0, index // page_size, -1)
    need = int(page.max().item()) + 1 if page.numel() else 0
    kmin, kmax = kmin.float(), kmax.float()
    if need > P:
        kmin = F.pad(kmin, (0, 0, 0, need - P), value=float("inf"))
        kmax = F.pad(kmax, (0, 0, 0, need - P), value=float("-inf"))
    if need <= 0 or D == 0:  # nothing appended anywhere
        return kmin.clone(), kmax.clone()
    page = page.clamp_min(0)
    idx = page.view(B, Hk, 1, 1).expand(B, Hk, 1, D)
    cur_min, cur_max = kmin.gather(2, idx), kmax.gather(2, idx)
    new_min = torch.where(active, torch.minimum(cur_min, k_new), cur_min)
    new_max = torch.where(active, torch.maximum(cur_max, k_new), cur_max)
    return kmin.scatter(2, idx, new_min), kmax.scatter(2, idx, new_max)


def grow_page_bounds(kmin: torch.Tensor, kmax: torch.Tensor, pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bound buffers ``[B, Hk, P, d]`` with room for ``pages`` pages (torch only).

    Returns the inputs when they are large enough; otherwise new buffers grown by a chunk (at least 16
    pages or 1/16 of the current size, so a long decode reallocates rarely) whose new pages are empty
    (``+inf`` / ``-inf``).
    """
    have = kmin.shape[2]
    if pages <= have:
        return kmin, kmax
    grow = max(pages - have, _PAGE_CHUNK, have // 16)
    return F.pad(kmin, (0, 0, 0, grow), value=float("inf")), F.pad(kmax, (0, 0, 0, grow), value=float("-inf"))


def widen_page_bounds_(
    kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, grown: torch.Tensor,
    page_size: int,
) -> None:  # fmt: skip
    """In place: widen the page of every row that grew by one entry with its key at ``lengths - 1``.

    Parameters
    ----------
    kmin, kmax
        fp32 bound buffers ``[B, Hk, P, d]`` (``P`` large enough, see :func:`grow_page_bounds`).
    keys
        The key cache ``[B, Hk, L, d]``.
    lengths, grown
        Current row lengths and how much each row grew since the bounds were right (``0`` or ``1``).
    page_size
        Entries per page.

    When every row has the same length and grew by one (the common decode step) the update is two
    element-wise operations on one page slice; otherwise a gather / scatter per row.
    """
    flat = lengths.flatten().tolist()
    if flat and all(x == flat[0] for x in flat) and bool((grown == 1).all()):
        n = flat[0]
        k_new = keys[:, :, n - 1].float()
        lo, hi = kmin[:, :, (n - 1) // page_size], kmax[:, :, (n - 1) // page_size]
        torch.minimum(lo, k_new, out=lo)
        torch.maximum(hi, k_new, out=hi)
        return
    b, hk, d = keys.shape[0], keys.shape[1], keys.shape[3]
    last = (lengths - 1).clamp_min(0)
    k_new = torch.gather(keys, 2, last[..., None, None].expand(b, hk, 1, d)).float()
    idx = (last // page_size)[..., None, None].expand(b, hk, 1, d)
    act = (grown == 1)[..., None, None]
    cur_lo, cur_hi = kmin.gather(2, idx), kmax.gather(2, idx)
    kmin.scatter_(2, idx, torch.where(act, torch.minimum(cur_lo, k_new), cur_lo))
    kmax.scatter_(2, idx, torch.where(act, torch.maximum(cur_hi, k_new), cur_hi))
