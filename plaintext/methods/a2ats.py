"""A²ATS — windowed RoPE + query-aware vector quantisation of keys for top-K retrieval, KV offloaded.

He, Xing, Wang, Xu, Wu, Zhou, Liu, Xue, Li. *A²ATS: Retrieval-Based KV Cache Reduction via Windowed
Rotary Position Embedding and Query-Aware Vector Quantization.* ACL 2025 Findings, arXiv 2502.12665
(code: github.com/junhuihe-hjh/A2ATS).

Every prompt key outside the sinks and the recent window is replaced, for scoring only, by the index of
its nearest codeword in an offline codebook (:mod:`mpckv.calibrate.a2ats`: k-means on pre-RoPE keys,
weighted by the query second moment through ``L``, ``‖(k − c)L‖²``). Windowed RoPE scores every such key
as if it were ``w`` positions behind the query, so a decode step costs one lookup table
``T[h, c] = RoPE(q_h, w)·Ĉ_c/√d`` (``Ĉ = codebook·L⁻¹``) and a gather ``ŝ[h, t] = T[h, id(t)]``. Each query
head takes its top tokens, the group's sets are united per KV head, and exact attention runs over the
union plus the sinks, the window and the generated tokens. The prompt's full K/V of the scored region live
in the cold tier (:class:`~mpckv.plaintext.tiered_store.TieredKVStore`); the selected rows are fetched
every step. The engine's cache keeps only sinks, window and generated tokens (the hot tier), plus the
ids and codebooks here.

Our deviations (see ``shared/methods/a2ats.md``):

* **Budget = tokens read.** Sinks and window are capped at a quarter of the budget each
  (:func:`~mpckv.plaintext.methods.selection_parts.forced_split`); the rest ``R`` goes to retrieval. With
  ``head_k="split"`` (default) every query head takes its top ``ceil(R/G)`` so the union never exceeds
  ``R``; ``"budget"`` is the paper's rule (top ``R`` per head, the union reads up to ``G·R``).
  The budget is resolved against the prompt length at prefill; generated tokens stay hot and are always
  attended (the paper encodes them into the pool too).
* **No CPU-side sparse attention**: the selected rows are copied to the hot tier and attended there
  (the paper computes that part where the KV lives and merges partial results).
* **Codebooks**: ``codebook="auto"`` uses the shipped calibration for the model's architecture and
  otherwise fits per-prompt codebooks on the prompt's own keys and queries (``prompt_codewords``, random
  init + ``prompt_iters`` Lloyd steps), so that any model runs; a file path uses that file; ``"prompt"``
  always fits. Shipped calibration is synthetic text (not fineweb + UUIDs) and ``C`` is smaller.
* ``wrope=False`` scores with the true positions (an oracle / ablation, O(N·d) per step).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mpckv.calibrate import config_signature, shipped_file
from mpckv.config import ModelConfig
from mpckv.errors import CheckpointError, ConfigError
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection
from mpckv.plaintext.methods.selection_parts import forced_split, mask_to_index
from mpckv.plaintext.rope import rerotate
from mpckv.plaintext.tiered_store import TieredKVStore
from mpckv.registry import register_method

__all__ = ["A2ATS", "A2Layer", "code_groups", "encode_keys", "lookup_scores", "scoring_codebook"]

_WARNED: set[int] = set()  # methods that already said they fall back to per-prompt codebooks
_BOOKS: dict[tuple[str, int, int], tuple[list[tuple[torch.Tensor, ...]], int]] = {}


def scoring_codebook(codebook: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``Ĉ = codebook · L⁻¹`` (``[..., C, d]``): codewords back in the key space, for scoring."""
    return codebook.float() @ torch.linalg.inv(chol.double()).float()


def encode_keys(k_pre: torch.Tensor, codebook: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``argmin_c ‖k L − codebook_c‖²`` for pre-RoPE keys ``[B, Hk, N, d]`` → ids ``[B, Hk, N]`` (int64).

    ``codebook [Hk or B·Hk-broadcastable, C, d]``, ``chol [.., d, d]``; ties go to the lowest index.
    """
    from mpckv.calibrate.a2ats import nearest

    return nearest(k_pre.float() @ chol.float(), codebook.float())


def lookup_scores(q_w: torch.Tensor, cb_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``ŝ[b, g, j, t] = (q_w[b, g·G + j] · Ĉ[b, g, :, ids[b, g, t]])`` → ``[B, Hk, G, N]`` (fp32).

    ``q_w [B, H, d]`` (already scaled and rotated), ``cb_t [B, Hk, d, C]`` (the scoring codebook,
    transposed), ``ids [B, Hk, N]``.
    """
    b, h, d = q_w.shape
    hk = cb_t.shape[1]
    g = h // hk
    table = q_w.float().view(b, hk, g, d) @ cb_t  # [B, Hk, G, C]
    return table.gather(3, ids[:, :, None, :].expand(b, hk, g, ids.shape[-1]))


def code_groups(ids: torch.Tensor, ok: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: tokens per codeword ``[B, Hk, C]`` and each token's rank within its codeword's tokens by
    position ``[B, Hk, N]`` (invalid tokens: not counted, rank ``N``)."""
    b, hk, n = ids.shape
    key = torch.where(ok, ids, torch.full_like(ids, c)) * n + torch.arange(n, device=ids.device)
    order = torch.sort(key, dim=-1).indices
    sid = torch.where(ok, ids, torch.full_like(ids, c)).gather(-1, order)
    counts = torch.zeros(b, hk, c + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(2, sid, torch.ones_like(sid))
    start = torch.cumsum(counts, -1) - counts
    rank_sorted = torch.arange(n, device=ids.device) - start.gather(-1, sid)
    rank = torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)
    return counts[..., :c].contiguous(), torch.where(ok, rank, torch.full_like(rank, n))


@dataclass
class A2Layer:
    """Per-layer A²ATS state."""

    ids: torch.Tensor  # [B, Hk, Nc] int16/int32 codeword ids of the scored region
    cb_t: torch.Tensor  # [B, Hk, d, C] fp32 scoring codebook (transposed; expanded views when shared)
    ctx_ok: torch.Tensor  # [B, Hk, Nc] real context tokens
    ctx_pos: torch.Tensor  # [B, Hk, Nc] their positions
    k_rows: torch.Tensor  # [B, Hk] tokens taken per query head (0 for exact rows)
    code_counts: torch.Tensor  # [B, Hk, C] context tokens per codeword
    grp_rank: torch.Tensor  # [B, Hk, Nc] rank of a token among its codeword's tokens (by position)
    store: TieredKVStore
    offset: int
    inv_freq: torch.Tensor


@register_method("a2ats")
@dataclass(kw_only=True)
class A2ATS(KVMethod):
    """Windowed-RoPE VQ retrieval of keys (He et al., ACL 2025 Findings).

    Parameters
    ----------
    budget:
        Tokens read per step and KV head (sinks + window + retrieved); default 3 % (the paper's ρ).
    sinks, window:
        Forced first / last prompt entries (paper: 8 / 64), each capped at a quarter of the budget.
    head_k:
        ``"split"``: each query head takes ``ceil(R/G)`` so the group's union is at most ``R``;
        ``"budget"``: ``R`` per head (the paper; the union may read ``G·R``).
    codebook:
        ``"auto"`` (shipped file for the architecture, else per-prompt), a ``.safetensors`` path from
        ``mpckv calibrate a2ats``, or ``"prompt"``.
    offset:
        WRoPE offset ``w``; 0 = the codebook file's (per-prompt codebooks: ``min(2048, max_pos // 4)``).
    wrope:
        Score at the fixed offset (``True``, the paper) or at the true positions (``False``).
    prompt_codewords, prompt_iters:
        Size and Lloyd steps of per-prompt codebooks.
    """

    sinks: int = field(default=8, metadata={"min": 0})
    window: int = field(default=64, metadata={"min": 0})
    head_k: Literal["split", "budget"] = "split"
    codebook: str = "auto"
    offset: int = field(default=0, metadata={"min": 0})
    wrope: bool = True
    prompt_codewords: int = field(default=256, metadata={"min": 1})
    prompt_iters: int = field(default=2, metadata={"min": 0})

    family = "selection"
    paper = "He et al., ACL 2025 Findings (arXiv 2502.12665)"
    secure = "no"
    secure_note = "4096-way argmin per key and O(N·C) oblivious lookups per step (see the card)"
    default_budget = 0.03

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_k not in ("split", "budget"):
            raise ConfigError(f"a2ats head_k must be 'split' or 'budget', got {self.head_k!r}")

    # ------------------------------------------------------------------ codebooks
    def check(self, config: ModelConfig) -> None:
        super().check(config)
        self.books(config)

    def books(self, config: ModelConfig) -> tuple[list[tuple[torch.Tensor, ...]], int] | None:
        """Per layer ``(codebook, chol)`` and the file's offset, or ``None`` for per-prompt codebooks."""
        if self.codebook == "prompt":
            return None
        sig = config_signature(config)
        if self.codebook == "auto":
            from mpckv.calibrate.a2ats import read_meta

            def matches(path: Path, signature: dict[str, Any]) -> bool:
                try:
                    return read_meta(path).get("config") == signature
                except CheckpointError:
                    return False

            found = shipped_file("a2ats_", ".safetensors", config, matches)
            if found is None:
                return None
            path = found
        else:
            path = Path(self.codebook).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(
                    f"a2ats: codebook file {path} not found; make one with `mpckv calibrate a2ats --model M "
                    "--out FILE` or pass --param codebook=prompt"
                )
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in _BOOKS:
            from mpckv.calibrate.a2ats import load_codebooks

            _BOOKS[key] = load_codebooks(path, sig)
        return _BOOKS[key]

    # ------------------------------------------------------------------ prefill
    def on_prefill(self, ctx: PrefillContext) -> None:
        lc = ctx.cache
        ctx.state["a2"] = None
        b, hk, d = lc.batch, lc.kv_heads, lc.head_dim
        n = lc.lengths
        budget = self.resolved_budget
        starts, sizes, rem = (torch.zeros(b, hk, dtype=torch.long) for _ in range(3))
        for i in range(b):
            for h in range(hk):
                nb = int(n[i, h])
                tok = budget.tokens_for(nb, ctx.layer, h)
                s_eff, w_eff = forced_split(tok, self.sinks, self.window)
                nc = nb - s_eff - w_eff
                r = tok - s_eff - w_eff
                if tok >= nb or nc <= 0 or r >= nc:
                    continue  # exact row
                starts[i, h], sizes[i, h], rem[i, h] = s_eff, nc, max(r, 1)
        if int(sizes.max()) == 0:
            return
        dev = lc.device
        starts, sizes, rem = starts.to(dev), sizes.to(dev), rem.to(dev)
        nc_max = int(sizes.max())
        j = torch.arange(nc_max, device=dev)
        ctx_ok = j < sizes[..., None]
        idx = (starts[..., None] + j).clamp_max(max(lc.max_length - 1, 0))
        keys = torch.gather(lc.k, 2, idx[..., None].expand(b, hk, nc_max, d))
        vals = torch.gather(lc.v, 2, idx[..., None].expand(b, hk, nc_max, d))
        pos = torch.gather(lc.pos, 2, idx)
        k_pre = rerotate(keys.float(), -pos, ctx.inv_freq)
        books = self.books(ctx.config)
        g = ctx.config.group_size
        if books is None:
            w = self.offset or min(2048, max(1, ctx.config.max_position_embeddings // 4))
            cb_t, ids = self._prompt_books(ctx, k_pre, ctx_ok, w)
        else:
            layer_books, file_w = books
            w = self.offset or file_w
            book, chol = (t.to(dev) for t in layer_books[ctx.layer])
            ids = encode_keys(k_pre, book, chol)
            cb_t = scoring_codebook(book, chol).transpose(-1, -2)[None].expand(b, hk, d, book.shape[1])
        c = cb_t.shape[-1]
        ids = ids.to(torch.int16 if c <= 2**15 else torch.int32)
        r = b * hk
        store = TieredKVStore(dev)
        store.offload("k", keys.reshape(r, nc_max, d))
        store.offload("v", vals.reshape(r, nc_max, d))
        k_rows = -(-rem // g) if self.head_k == "split" else rem
        code_counts, grp_rank = code_groups(ids.long(), ctx_ok, c)
        # the hot tier keeps everything outside the scored region
        t = torch.arange(lc.max_length, device=dev)
        inside = (t >= starts[..., None]) & (t < (starts + sizes)[..., None])
        keep = lc.valid() & ~inside
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True)
        lc.compact(order.indices, order.values == 0)
        ctx.state["a2"] = A2Layer(
            ids, cb_t, ctx_ok, pos, k_rows, code_counts, grp_rank, store, int(w), ctx.inv_freq
        )

    def _prompt_books(
        self, ctx: PrefillContext, k_pre: torch.Tensor, ok: torch.Tensor, w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row codebooks fitted on the prompt (query-weighted, random init), and the ids."""
        from mpckv.calibrate.a2ats import kmeans, query_cholesky

        b, hk, nc, d = k_pre.shape
        g = ctx.config.group_size
        t = ctx.q.shape[2]
        qpos = torch.arange(t, device=ctx.q.device).expand(ctx.q.shape[:3])
        q_w = rerotate(ctx.q.float(), w - qpos, ctx.inv_freq)
        valid_q = torch.arange(t, device=ctx.q.device)[None] < ctx.prompt_lengths[:, None]
        c = min(self.prompt_codewords, max(1, int(ok.sum(-1).max())))
        cbs = torch.zeros(b, hk, d, c, device=k_pre.device)
        ids = torch.zeros(b, hk, nc, dtype=torch.long, device=k_pre.device)
        for i in range(b):
            for h in range(hk):
                kx = k_pre[i, h][ok[i, h]].cpu()
                if kx.shape[0] == 0:
                    continue  # an exact row: nothing to score
                # one generator per (layer, KV head): a row's codebook does not depend on the batch
                gen = torch.Generator().manual_seed(1_000_003 * ctx.layer + h)
                qx = q_w[i, h * g : (h + 1) * g][:, valid_q[i]].reshape(-1, d).cpu()
                chol = query_cholesky(qx, 1e-6)
                book = kmeans(kx @ chol, min(c, kx.shape[0]), self.prompt_iters, gen, init="random")
                dev_book, dev_chol = book.to(k_pre.device), chol.to(k_pre.device)
                ids[i, h] = encode_keys(k_pre[i, h][None, None], dev_book, dev_chol)[0, 0]
                cbs[i, h, :, : book.shape[0]] = scoring_codebook(book, chol).T.to(k_pre.device)
        if self.codebook == "auto" and id(self) not in _WARNED:
            _WARNED.add(id(self))
            warnings.warn(
                "a2ats: no shipped codebook for this model; using per-prompt codebooks "
                "(calibrate with `mpckv calibrate a2ats`)",
                stacklevel=3,
            )
        return cbs, ids

    # ------------------------------------------------------------------ decode
    def token_scores(self, ctx: DecodeContext, st: A2Layer) -> torch.Tensor:
        """Approximate scores ``[B, Hk, G, Nc]`` (``-inf`` outside the context region)."""
        b, h, d = ctx.q.shape
        q = ctx.q.float() * ctx.scale
        if self.wrope:
            delta = (st.offset - ctx.positions)[:, None].expand(b, h)
            s = lookup_scores(rerotate(q, delta, st.inv_freq), st.cb_t, st.ids.long())
        else:
            hk = st.ids.shape[1]
            words = st.cb_t.transpose(-1, -2).gather(
                2, st.ids.long()[..., None].expand(*st.ids.shape, d)
            )  # [B, Hk, Nc, d]
            k_hat = rerotate(words, st.ctx_pos, st.inv_freq)
            s = q.view(b, hk, h // hk, d) @ k_hat.transpose(-1, -2)
        return s.masked_fill(~st.ctx_ok[:, :, None], float("-inf"))

    def retrieve(self, ctx: DecodeContext, st: A2Layer) -> torch.Tensor:
        """Union over each group of the per-head top tokens: mask ``[B, Hk, Nc]``.

        With WRoPE a token's score is its codeword's table entry, so a head's top ``k`` is found on the
        ``C`` table entries: codewords in descending order (ties → lower codeword) are taken whole while
        their token counts fit, and the next one contributes its lowest-position tokens — an exact top-k
        of ``ŝ`` in ``O(C log C + N)`` (no top-k over ``N``).
        """
        b, h, d = ctx.q.shape
        hk = st.ids.shape[1]
        g = h // hk
        k = st.k_rows[:, :, None, None]
        if not self.wrope:
            s = self.token_scores(ctx, st)
            kmax = max(1, min(int(st.k_rows.max()), s.shape[-1]))
            top = torch.topk(s, kmax, dim=-1).indices
            col = torch.arange(kmax, device=s.device)
            top = torch.where(col < k, top, top[..., :1])
            mask = torch.zeros(b, hk, s.shape[-1], dtype=torch.bool, device=s.device)
            mask.scatter_(2, top.flatten(2), True)
            return mask & st.ctx_ok & (st.k_rows > 0)[..., None]
        q = ctx.q.float() * ctx.scale
        delta = (st.offset - ctx.positions)[:, None].expand(b, h)
        table = rerotate(q, delta, st.inv_freq).view(b, hk, g, d) @ st.cb_t  # [B, Hk, G, C]
        c = table.shape[-1]
        order = torch.sort(table, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(c, device=order.device).expand_as(order).contiguous()
        )
        sorted_counts = st.code_counts[:, :, None, :].expand(b, hk, g, c).gather(-1, order)
        csum = torch.cumsum(sorted_counts, dim=-1)
        p = (csum < k).sum(-1, keepdim=True)  # codewords taken whole
        before = (csum - sorted_counts).gather(-1, p.clamp_max(c - 1))
        need = (k - before).expand(b, hk, g, 1)  # tokens of the partial codeword, lowest positions
        # per codeword, how many of its tokens (by position rank) the group takes: all of a codeword
        # some head takes whole, else the largest share any head takes of it as its partial codeword
        n = st.ids.shape[-1]
        whole = (rank < p).any(2)  # [B, Hk, C]
        partial = order.gather(-1, p.clamp_max(c - 1))  # [B, Hk, G, 1] the partial codeword of each head
        need = torch.where(p < c, need, torch.zeros_like(need))
        share = torch.zeros(b, hk, c, dtype=torch.long, device=table.device)
        share.scatter_reduce_(2, partial.flatten(2), need.flatten(2), reduce="amax")
        take = torch.where(whole, torch.full_like(share, n), share)
        return (st.grp_rank < take.gather(2, st.ids.long())) & st.ctx_ok

    def select(self, ctx: DecodeContext) -> Selection | None:
        st: A2Layer | None = ctx.state.get("a2")
        if st is None:
            return None
        mask = self.retrieve(ctx, st)
        b, hk, nc = mask.shape
        index, valid = mask_to_index(mask)  # one nonzero, no int64 pass over the context
        counts = valid.sum(-1)
        width = index.shape[-1]
        r = b * hk
        rows = torch.arange(r, device=mask.device).repeat_interleave(width)
        st.store.begin_step()
        d = ctx.q.shape[-1]
        kf = st.store.fetch("k", rows, index.reshape(-1)).view(b, hk, width, d)
        vf = st.store.fetch("v", rows, index.reshape(-1)).view(b, hk, width, d)

        def gather(lc: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
            k_all = torch.cat([kf.to(lc.dtype), lc.keys()], dim=2)
            v_all = torch.cat([vf.to(lc.dtype), lc.values()], dim=2)
            tot = width + lc.lengths
            if bool((counts == width).all()):
                return k_all, v_all, tot, None
            return k_all, v_all, tot, torch.cat([valid, lc.valid()], dim=2)

        return Selection(index=index, valid=valid, gather=gather)
