"""ShadowKV — low-rank pre-RoPE keys and chunk landmarks in the hot tier, values in the cold tier.

Sun, Chang, Bao, Zheng, Zheng, Liu, Dong, Chi, Chen. *ShadowKV: KV Cache in Shadows for High-Throughput
Long-Context LLM Inference.* arXiv 2410.21465 (ICML 2025; code: github.com/bytedance/ShadowKV).

At prefill every layer keeps, per sequence, a rank-``r`` factorisation of the pre-RoPE keys of the prompt
(one basis for all KV heads: ``K_pre [N, Hk·d] ≈ U · SV``), the mean of every ``chunk`` consecutive
post-RoPE keys (landmarks), a few *outlier* chunks whose keys disagree with their landmark (kept exactly)
and a local tail (kept exactly); the prompt's values go to the cold tier
(:class:`~mpckv.plaintext.tiered_store.TieredKVStore`). The engine's cache then holds only the exact hot
entries (outliers, tail, and every generated token). Each decode step scores the landmarks
(``softmax(q·L/√d)``, maximum over the GQA group), takes the top chunks per KV head, rebuilds their keys
from the factors and re-applies RoPE at their original positions, fetches their values from the cold
tier, and attends exactly over ``[selected chunks | outliers | tail | generated]``. Chunks resident from
the previous step are reused (the temporal cache, :class:`~mpckv.plaintext.tiered_store.ResidentSlots`):
only misses are rebuilt and fetched.

Our deviations from the paper / released code (see ``shared/methods/shadowkv.md``):

* **Budget = tokens read.** The token budget ``T`` (of the prompt length, resolved at prefill) pays for
  the local tail, the outliers and the selected chunks: ``n_out = round(outlier_ratio·T / chunk)``
  outlier chunks (the offloaded class's ``24·S/1024`` rule: ratio 0.1875), the tail ``min(local_chunks,
  T // 4 // chunk)`` chunks plus the remainder, and ``K = max(min_chunks, (T − tail − n_out·chunk) //
  chunk)`` selected chunks. Generated tokens are read in addition (never compressed, as in the paper).
  ``K`` is capped at the chunks left after the outliers; a budget >= the prompt keeps the row exact
  (dense).
* **Any prompt length** (``min_prompt``, default 0; the paper applies ShadowKV above 4K tokens only).
* **Subspace by eigendecomposition** of the Gram matrix ``K_preᵀK_pre`` (float64 ``eigh``) instead of an
  SVD: the same rank-``r`` projection ``K_pre V_r V_rᵀ`` at a fraction of the cost; ``U = K_pre V_r``
  carries the singular values (``SV = V_rᵀ``). The rank is capped at ``Hk·d`` (full rank reproduces the
  keys up to fp32 rounding).
* **Scale** of the landmark softmax is the model's ``1/√d`` (the code hard-codes ``1/√128``).
* **Prefetch** (``prefetch`` > 0): the next-best chunks after the top ``K`` are also loaded into the hot
  tier (not attended), as the likely next-step chunks. Off by default.
* No CUDA side stream: on CUDA the cold tier is pinned and copies are non-blocking, but the key rebuild
  and the value copy are not explicitly overlapped.
* Needs every KV head of a sequence to hold the same tokens (one shared basis); compose it only after
  methods that keep such a layout (raises :class:`~mpckv.errors.ConfigError` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection
from mpckv.plaintext.methods.topk import select_topk, topk_ascending
from mpckv.plaintext.rope import rerotate
from mpckv.plaintext.tiered_store import ResidentSlots, TieredKVStore
from mpckv.registry import register_method

__all__ = ["ShadowKV", "ShadowLayer", "low_rank_keys", "outlier_scores"]


@dataclass
class ShadowLayer:
    """Per-layer ShadowKV state (hot-tier structures, the cold store and the resident chunks)."""

    u: torch.Tensor  # [B, n_ch, chunk, r] fp32 low-rank coefficients of the context tokens
    sv: torch.Tensor  # [B, Hk, r, d] fp32 basis rows per KV head
    pos: torch.Tensor  # [B, n_ch, chunk] original positions of the context tokens
    landmarks_t: torch.Tensor  # [B, Hk, d, n_ch] fp32 chunk means of the post-RoPE keys (transposed)
    land_ok: torch.Tensor  # [B, Hk, n_ch] selectable chunks (context, not outliers)
    k_chunks: torch.Tensor  # [B, Hk] selected chunks per step
    cos: torch.Tensor  # [B, n_ch, chunk, d/2] RoPE tables of the context positions
    sin: torch.Tensor
    store: TieredKVStore
    slots: ResidentSlots
    kres: torch.Tensor  # [B·Hk, S, chunk, d] rebuilt keys of the resident chunks
    vres: torch.Tensor  # [B·Hk, S, chunk, d] fetched values of the resident chunks
    rebuilt: int = 0  # chunks rebuilt (misses) over all steps


def low_rank_keys(k_pre: torch.Tensor, valid: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of pre-RoPE keys ``[B, Hk, N, d]`` with one basis over the KV heads.

    ``valid [B, N]`` marks real tokens (others are zeroed, so they do not change the basis). Returns
    ``U [B, N, r]`` and ``SV [B, Hk, r, d]`` with ``U @ SV[:, g] ≈ k_pre[:, g]`` (the projection onto the
    top-``r`` right singular vectors of the ``[N, Hk·d]`` matrix).
    """
    b, hk, n, d = k_pre.shape
    x = k_pre.float().permute(0, 2, 1, 3).reshape(b, n, hk * d) * valid[..., None]
    r = min(rank, hk * d)
    gram = (x.transpose(1, 2) @ x).double()
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    basis = vecs[..., -r:].flip(-1).float()  # [B, Hk·d, r], largest first
    u = x @ basis
    sv = basis.transpose(1, 2).reshape(b, r, hk, d).permute(0, 2, 1, 3).contiguous()
    return u, sv


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the ``rotate_half`` layout of :mod:`~mpckv.plaintext.rope`; tables ``[..., d/2]``."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    shape = torch.broadcast_shapes(x.shape, (*cos.shape[:-1], 2 * h))
    out = torch.empty(shape, dtype=torch.result_type(x, cos), device=x.device)
    lo, hi = out[..., :h], out[..., h:]
    # the same products and sums as ``cat([x1·cos − x2·sin, x2·cos + x1·sin])``, written in place (no cat)
    torch.mul(x1, cos, out=lo).sub_(x2 * sin)
    torch.mul(x2, cos, out=hi).add_(x1 * sin)
    return out


def _rope_tables(ctx: PrefillContext, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos/sin tables ``[B, n_ch, chunk, d/2]`` of ``pos``, shared by the layers of a prefill
    (kept in the first layer's state) when their context positions agree."""
    home = ctx.all_states[0] if ctx.all_states else ctx.state
    got = home.get("skv_rope")
    if (
        got is not None
        and got[0].shape == pos.shape
        and torch.equal(got[0], pos)
        and torch.equal(got[1], ctx.inv_freq)
    ):
        return got[2], got[3]
    freqs = pos.float()[..., None] * ctx.inv_freq.to(pos.device)
    cos, sin = freqs.cos(), freqs.sin()
    home["skv_rope"] = (pos, ctx.inv_freq, cos, sin)
    return cos, sin


def outlier_scores(keys: torch.Tensor, landmarks: torch.Tensor, chunk: int) -> torch.Tensor:
    """``m[j] = min_{t in chunk j} cos(L_j, k_t)`` for ``keys [B, Hk, n_ch·chunk, d]`` → ``[B, Hk, n_ch]``."""
    b, hk, n, d = keys.shape
    kc = keys.float().view(b, hk, n // chunk, chunk, d)
    dots = (kc * landmarks[..., None, :]).sum(-1)
    norms = kc.norm(dim=-1) * landmarks.norm(dim=-1)[..., None]
    return (dots / norms.clamp_min(1e-12)).amin(-1)


@register_method("shadowkv")
@dataclass(kw_only=True)
class ShadowKV(KVMethod):
    """Low-rank keys + chunk landmarks + offloaded values (Sun et al., arXiv 2410.21465).

    Parameters
    ----------
    budget:
        Tokens read per step and KV head (ratio of the prompt, token count, per-layer / per-head list):
        tail + outliers + selected chunks; default 1.56 % (the paper's 1024 tokens at 64K).
    chunk:
        Tokens per landmark chunk (paper: 8).
    rank:
        Rank of the pre-RoPE key factorisation (paper: 160), capped at ``Hk·d``.
    local_chunks:
        Exact tail chunks (paper: 4), plus the prompt's remainder; capped at a quarter of the budget.
    outlier_ratio:
        Share of the budget spent on exact outlier chunks (0.1875 = the offloaded class's 24 per 1024).
    min_chunks:
        Selected chunks per step at least.
    prefetch:
        Runner-up chunks loaded into the hot tier per step besides the selected ones (not attended).
    reuse:
        Keep chunks resident between steps (the temporal cache); ``False`` rebuilds and fetches every
        selected chunk every step.
    min_prompt:
        Rows with a shorter prompt stay exact (paper: 4096).
    """

    chunk: int = field(default=8, metadata={"min": 1})
    rank: int = field(default=160, metadata={"min": 1})
    local_chunks: int = field(default=4, metadata={"min": 0})
    outlier_ratio: float = field(default=0.1875, metadata={"min": 0.0, "max": 1.0})
    min_chunks: int = field(default=1, metadata={"min": 1})
    prefetch: int = field(default=0, metadata={"min": 0})
    reuse: bool = True
    min_prompt: int = field(default=0, metadata={"min": 0})

    family = "selection"
    paper = "Sun et al., ICML 2025 (arXiv 2410.21465)"
    secure = "planned"
    secure_note = "per-prompt SVD is impractical under MPC; needs a public offline basis (see the card)"
    default_budget = 0.0156

    # ------------------------------------------------------------------ prefill
    def chunk_plan(self, n: torch.Tensor, layer: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
        """``(n_ch [B], n_out [B, Hk], k [B, Hk])`` for prompt lengths ``n [B]`` (see the budget rule)."""
        c = self.chunk
        budget = self.resolved_budget
        rows_ch, rows_out, rows_k = [], [], []
        for nb in n.tolist():
            toks = [budget.tokens_for(nb, layer, h) for h in range(kv_heads)]
            local = min(self.local_chunks, min(toks) // 4 // c)
            n_ch = max(0, nb // c - local) if nb >= self.min_prompt else 0
            tail = nb - n_ch * c
            outs, ks = [], []
            for t in toks:
                n_out = min(n_ch, round(self.outlier_ratio * t / c))
                k = min(max(self.min_chunks, (t - tail - n_out * c) // c), n_ch - n_out)
                if t >= nb or n_ch == 0:
                    n_out, k = n_ch, 0
                outs.append(n_out)
                ks.append(k)
            rows_ch.append(n_ch)
            rows_out.append(outs)
            rows_k.append(ks)
        dev = n.device
        return (
            torch.tensor(rows_ch, dtype=torch.long, device=dev),
            torch.tensor(rows_out, dtype=torch.long, device=dev),
            torch.tensor(rows_k, dtype=torch.long, device=dev),
        )

    def on_prefill(self, ctx: PrefillContext) -> None:
        lc = ctx.cache
        ctx.state["skv"] = None
        b, hk, d, c = lc.batch, lc.kv_heads, lc.head_dim, self.chunk
        lengths = lc.lengths
        n = lengths[:, 0]
        n_ch, n_out, k_chunks = self.chunk_plan(n, ctx.layer, hk)
        if int(k_chunks.max()) == 0:
            return  # every row exact (dense)
        live = lc.valid()
        same = bool((lengths == lengths[:, :1]).all()) and bool(
            ((lc.positions() == lc.positions()[:, :1]) | ~live).all()
        )
        if not same:
            raise ConfigError(
                "shadowkv needs every KV head of a sequence to hold the same tokens (one key basis); "
                "compose it only after methods that keep a shared layout"
            )
        m = int(n_ch.max())
        nt = m * c
        keys = lc.k[:, :, :nt].float()
        pos = lc.pos[:, 0, :nt]
        tok_ok = torch.arange(nt, device=lc.device)[None] < (n_ch * c)[:, None]  # [B, nt]
        k_pre = rerotate(keys, -pos[:, None, :].expand(b, hk, nt), ctx.inv_freq)
        u, sv = low_rank_keys(k_pre, tok_ok, self.rank)
        landmarks = keys.view(b, hk, m, c, d).mean(3)
        ch = torch.arange(m, device=lc.device)
        ch_ok = (ch[None] < n_ch[:, None])[:, None, :].expand(b, hk, m)
        m_cos = outlier_scores(keys, landmarks, c)
        out_idx, out_valid = select_topk(-m_cos, n_out, invalid=~ch_ok)
        outlier = torch.zeros(b, hk, m + 1, dtype=torch.bool, device=lc.device)
        outlier.scatter_(2, torch.where(out_valid, out_idx, torch.full_like(out_idx, m)), True)
        outlier = outlier[..., :m]
        land_ok = ch_ok & ~outlier
        # cold tier: the values of the context chunks, chunk-major
        store = TieredKVStore(lc.device)
        store.offload("v", lc.v[:, :, :nt].reshape(b * hk, m, c * d))
        # hot exact entries: outlier chunks + tail; the rest leaves the engine cache
        t_idx = torch.arange(lc.max_length, device=lc.device)
        in_ctx = t_idx[None, None] < (n_ch * c)[:, None, None]
        chunk_of = (t_idx // c).clamp_max(max(m - 1, 0))
        keep = live & (~in_ctx | (outlier.gather(2, chunk_of.expand(b, hk, -1)) if m else in_ctx))
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
        lc.compact(order, torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).values == 0)
        cos, sin = _rope_tables(ctx, pos.reshape(b, m, c))
        kmax = int(k_chunks.max())
        s = kmax + self.prefetch
        dt = lc.dtype
        ctx.state["skv"] = ShadowLayer(
            u=u.view(b, m, c, -1),
            sv=sv,
            pos=pos.reshape(b, m, c),
            landmarks_t=landmarks.transpose(-1, -2).contiguous(),
            land_ok=land_ok,
            k_chunks=k_chunks,
            cos=cos,
            sin=sin,
            store=store,
            slots=ResidentSlots(b * hk, m, s, lc.device),
            kres=torch.zeros(b * hk, s, c, d, dtype=dt, device=lc.device),
            vres=torch.zeros(b * hk, s, c, d, dtype=dt, device=lc.device),
        )

    # ------------------------------------------------------------------ decode
    def chunk_scores(self, ctx: DecodeContext, st: ShadowLayer) -> torch.Tensor:
        """``max_{h in group} softmax_j(q_h·L_j·scale)`` over selectable chunks → ``[B, Hk, n_ch]``
        (``-1`` for chunks that cannot be selected)."""
        b, h, d = ctx.q.shape
        hk = st.landmarks_t.shape[1]
        qg = ctx.q.float().view(b, hk, h // hk, d) * ctx.scale
        s = qg @ st.landmarks_t
        s = s.masked_fill(~st.land_ok[:, :, None], float("-inf"))
        p = torch.nan_to_num_(torch.softmax(s, dim=-1), nan=0.0).amax(2)
        return p.masked_fill(~st.land_ok, -1.0)

    def select_chunks(
        self, ctx: DecodeContext, st: ShadowLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(chunks, valid) [B, Hk, K]`` selected this step and the prefetch chunks ``[B, Hk, E]``."""
        scores = self.chunk_scores(ctx, st)
        kk = st.k_chunks
        kmax = int(kk.max())
        uniform = bool((kk == kmax).all())
        if self.prefetch:
            total = min(kmax + self.prefetch, scores.shape[-1])
            ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :total]
            col = torch.arange(kmax, device=kk.device)
            valid = (col < kk[..., None]) & (scores.gather(-1, ranked[..., :kmax]) > -1)
            return ranked[..., :kmax], valid, ranked[..., kmax:]
        if uniform:
            idx = topk_ascending(scores, kmax)
            return idx, scores.gather(-1, idx) > -1, None
        idx, valid = select_topk(scores, kk, invalid=~st.land_ok)
        return idx, valid, None

    def select(self, ctx: DecodeContext) -> Selection | None:
        st: ShadowLayer | None = ctx.state.get("skv")
        if st is None:
            return None
        b, hk = st.k_chunks.shape
        c = self.chunk
        chunks, valid, extra = self.select_chunks(ctx, st)
        r = b * hk
        if not self.reuse:
            st.slots.unit_ids.fill_(-1)
        st.store.begin_step()
        plan = st.slots.plan(
            chunks.reshape(r, -1), valid.reshape(r, -1), None if extra is None else extra.reshape(r, -1)
        )
        if plan.misses:
            self._load(st, plan.miss_rows, plan.miss_units, plan.miss_slots)
        s = st.slots.slots
        d = st.kres.shape[-1]
        attend = plan.attend.view(b, hk, s)
        all_in = bool(attend.all())

        def gather(lc: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
            ks = torch.cat([st.kres.view(b, hk, s * c, d), lc.keys()], dim=2)
            vs = torch.cat([st.vres.view(b, hk, s * c, d), lc.values()], dim=2)
            counts = s * c + lc.lengths
            if all_in:
                return ks, vs, counts, None
            keep = torch.cat([attend.repeat_interleave(c, dim=2), lc.valid()], dim=2)
            return ks, vs, counts, keep

        idx = chunks  # public sizes only: the engine reads through ``gather``
        return Selection(index=idx, valid=valid, gather=gather)

    def _load(self, st: ShadowLayer, rows: torch.Tensor, units: torch.Tensor, slots: torch.Tensor) -> None:
        """Rebuild the keys (low-rank + RoPE) and fetch the values of the missing chunks into their slots."""
        hk = st.sv.shape[1]
        c = self.chunk
        m = rows.numel()
        # pad the misses per row so that one batched GEMM per row rebuilds them
        counts = torch.bincount(rows, minlength=st.kres.shape[0])
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        col = torch.arange(m, device=rows.device) - starts[rows]
        r_all = counts.numel()
        pad_units = torch.zeros(r_all, width, dtype=torch.long, device=rows.device)
        pad_units[rows, col] = units
        bidx = torch.arange(r_all, device=rows.device) // hk
        m_ch = st.u.shape[1]
        flat = (bidx[:, None] * m_ch + pad_units).reshape(-1)
        rr = st.u.shape[-1]
        d = st.sv.shape[-1]
        u_rows = st.u.view(-1, c * rr).index_select(0, flat)  # [R·W, c·r]
        sv = st.sv.reshape(r_all, rr, d)
        k_pre = u_rows.view(r_all, width * c, rr) @ sv  # [R, W·c, d]
        cos = st.cos.view(-1, c * (d // 2)).index_select(0, flat).view(r_all, width * c, d // 2)
        sin = st.sin.view(-1, c * (d // 2)).index_select(0, flat).view(r_all, width * c, d // 2)
        k_post = _rope_half(k_pre, cos, sin).view(r_all, width, c, d)
        # whole-chunk copies on flat views (index_select / index_copy_, not advanced indexing)
        if st.slots.slots > st.kres.shape[1]:
            raise ConfigError(
                f"shadowkv: {st.slots.slots} resident slots but buffers for {st.kres.shape[1]}; "
                "the slot count must not grow after prefill"
            )
        dst = rows * st.kres.shape[1] + slots
        picked = k_post.view(r_all * width, c, d).index_select(0, rows * width + col)
        st.kres.view(-1, c, d).index_copy_(0, dst, picked.to(st.kres.dtype))
        vals = st.store.fetch("v", rows, units)
        st.vres.view(-1, c, d).index_copy_(0, dst, vals.view(m, c, d).to(st.vres.dtype))
        st.rebuilt += m
