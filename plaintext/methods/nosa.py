"""NOSA — query-aware + query-agnostic block selection with a locality bound ("NOSA-rule").

Huang, Wang, Han, Zhao, Su, Sun, Lyu, Zhao, Wang, Xiao, Han, Liu. *NOSA: Native and Offloadable Sparse
Attention.* arXiv 2510.13602 (code: github.com/thunlp/NOSA).

Per KV head the cache is cut into blocks. Compressed keys (means of ``2·stride`` tokens every ``stride``)
give query-aware scores ``s_j = Σ_{h∈g} softmax_j(q_h·k̃_j/√d)``; a query-agnostic importance
``b_t = A·softplus(W_Δ v_t + c)`` gives a second, query-independent score; both are max-pooled to blocks
over the compressed windows that overlap each block. The init block, the recent window and the ``k_q``
best query-aware blocks form ``QA``; the final set ``F`` is ``QA`` plus the best blocks by importance, so
at most ``|QA_t \\ QA_{t−1}|`` blocks change per step when no block is added (the locality bound).

Deviations (see ``shared/methods/nosa.md``):

* **Untrained model.** NOSA is a trained architecture; ordinary checkpoints were not trained with it.
  ``bias="auto"`` uses the shipped bias head fitted by ``mpckv train-bias nosa`` on the frozen model when
  one matches the architecture (:mod:`mpckv.calibrate.nosa_bias`, a regression of later attention mass),
  else ``b ≡ 0`` ("NOSA-rule (untrained)": ties among the query-agnostic blocks go to earlier blocks).
* **The bias is used for selection only.** The engine's attention has no additive per-token logit, so
  ``softmax(q·k/√d + b)`` is not applied (with ``b ≡ 0`` both agree). Needed engine change: an optional
  ``Selection.bias`` added to the logits.
* **Sizes follow the budget.** ``K = max(1, tokens // block)`` blocks; window ``min(window_blocks, K//4)``
  (at least the current block), init ``min(init_blocks, K//4)``, ``k_q = max(1, min(k_q, K//4))``. A
  budget below ``4·block`` tokens shrinks the block to ``tokens // 4`` (stride = block/4 when it divides,
  else 1) so that small budgets still select. Defaults: block 64, stride 16, kernel 32, 64 blocks.
* Decode only (prefill is dense); compressed keys and importances are kept incrementally in ``ctx.state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mpckv.calibrate import shipped_file
from mpckv.calibrate.nosa_bias import NosaBias, load_bias, read_meta
from mpckv.config import ModelConfig
from mpckv.errors import CheckpointError, ConfigError
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, Selection
from mpckv.plaintext.methods.selection_parts import blocks_to_tokens, head_scores, row_tokens
from mpckv.plaintext.methods.topk import select_topk
from mpckv.registry import register_method

_CACHE: dict[tuple[str, int], NosaBias] = {}


def _matches(path: Path, signature: dict[str, Any]) -> bool:
    try:
        return read_meta(path).get("config") == signature
    except CheckpointError:
        return False


@register_method("nosa")
@dataclass(kw_only=True)
class Nosa(KVMethod):
    """NOSA's inference rule: query-aware + query-agnostic blocks (Huang et al. 2025).

    Parameters
    ----------
    budget:
        Tokens read per step and KV head (ratio, count, per layer / head); ``K = tokens // block`` blocks.
        Default 4096 (64 blocks of 64).
    block, stride:
        Block size and compression stride (kernel ``2·stride``); paper 64 / 16.
    init_blocks, window_blocks, k_q:
        Forced initial blocks (1), recent blocks (16) and query-aware extra blocks (16).
    bias:
        ``"auto"`` (shipped weights for the architecture, else zero), ``"zero"`` or a ``.safetensors`` file
        from ``mpckv train-bias nosa``.
    """

    block: int = field(default=64, metadata={"min": 1})
    stride: int = field(default=16, metadata={"min": 1})
    init_blocks: int = field(default=1, metadata={"min": 0})
    window_blocks: int = field(default=16, metadata={"min": 1})
    k_q: int = field(default=16, metadata={"min": 1})
    bias: str = "auto"

    family = "selection"
    paper = "Huang et al., arXiv 2510.13602"
    secure = "planned"
    secure_note = "softmax over N/16 compressed keys and two top-k over N/64 blocks; static ranking reusable"
    default_budget = 4096

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        if self.block % self.stride:
            raise ConfigError(f"nosa: stride {self.stride} must divide block {self.block}")
        self.bias_head(config)

    def bias_head(self, config: ModelConfig) -> NosaBias | None:
        """The bias weights (``None`` = ``b ≡ 0``)."""
        if self.bias == "zero":
            return None
        if self.bias == "auto":
            found = shipped_file("nosa_", ".safetensors", config, _matches)
            if found is None:
                return None
            path = str(found)
        else:
            path = str(Path(self.bias).resolve())
        key = (path, id(config))
        if key not in _CACHE:
            _CACHE[key] = load_bias(path, config)
        return _CACHE[key]

    # ------------------------------------------------------------------ sizes
    def sizes(self, tokens: int) -> tuple[int, int, int, int, int, int]:
        """``(block, stride, K, init, window, k_q)`` for a budget of ``tokens``."""
        blk, s = self.block, self.stride
        if tokens < 4 * blk:
            blk = max(1, tokens // 4)
            s = blk // 4 if blk >= 4 and blk % 4 == 0 else 1
        k = max(1, tokens // blk)
        quarter = k // 4
        return (
            blk,
            s,
            k,
            min(self.init_blocks, quarter),
            max(1, min(self.window_blocks, quarter)),
            max(1, min(self.k_q, quarter)),
        )

    # ------------------------------------------------------------------ incremental summaries
    def _summaries(self, ctx: DecodeContext, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk sums of keys ``[B, Hk, nc, d]`` and of importances ``[B, Hk, nc]`` (chunks of ``s``)."""
        cache, st = ctx.cache, ctx.state
        key = f"nosa{s}"
        lengths = cache.lengths
        nc = -(-cache.max_length // s)
        prev = st.get(f"{key}_lengths")
        same = (
            prev is not None and prev.shape == lengths.shape and st.get(f"{key}_version") == cache.version
        )  # fmt: skip
        grown = lengths - prev if same else None
        head = self.bias_head(ctx.config)
        lo, hi = 0, 0  # first and last chunk whose sum changed (a rebuild starts a new buffer)
        if grown is None or not bool(((grown == 0) | (grown == 1)).all()):
            ksum, bsum = _chunk_sums(cache, s, self._bias_of(head, ctx.layer, cache.values()), nc)
        else:
            ksum, bsum = _grow(st[f"{key}_ksum"], nc), _grow(st[f"{key}_bsum"], nc)
            rows = grown == 1
            if bool(rows.any()):
                at = (lengths - 1).clamp_min(0)
                kn = torch.gather(cache.k, 2, at[..., None, None].expand(*at.shape, 1, cache.k.shape[-1]))[
                    :, :, 0
                ]
                vn = torch.gather(cache.v, 2, at[..., None, None].expand(*at.shape, 1, cache.v.shape[-1]))
                bn = self._bias_of(head, ctx.layer, vn)[..., 0]
                ch = (at // s)[..., None]
                m = rows.float()
                ksum.scatter_add_(
                    2, ch[..., None].expand(*ch.shape, kn.shape[-1]), (kn.float() * m[..., None])[:, :, None]
                )
                bsum.scatter_add_(2, ch, (bn * m)[..., None])
                lo, hi = int(ch.min()), int(ch.max())
            else:
                lo, hi = ksum.shape[2], -1
        st.update({f"{key}_ksum": ksum, f"{key}_bsum": bsum, f"{key}_lengths": lengths.clone()})
        st[f"{key}_version"] = cache.version
        st[f"{key}_changed"] = (lo, hi)
        return ksum[:, :, :nc], bsum[:, :, :nc]

    @staticmethod
    def _bias_of(head: NosaBias | None, layer: int, v: torch.Tensor) -> torch.Tensor:
        if head is None:
            return torch.zeros(v.shape[:3], device=v.device)
        return head.bias(layer, v).to(v.device)

    # ------------------------------------------------------------------ selection
    def select_blocks(
        self, ctx: DecodeContext, tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """``(F index, F valid, QA mask [B, Hk, nb], block)`` for every row with the geometry of a
        ``tokens`` budget, or ``None`` when every block fits."""
        cache = ctx.cache
        lengths = cache.lengths
        blk, s, k, n_init, n_win, kq = self.sizes(tokens)
        nb_row = (lengths + blk - 1) // blk
        if bool((nb_row <= k).all()):
            return None
        ksum, _ = self._summaries(ctx, s)
        st, key = ctx.state, f"nosa{s}"
        kc_buf, bc_buf = _window_means(
            st, key, st[f"{key}_ksum"], st[f"{key}_bsum"], s, *st[f"{key}_changed"]
        )
        nc = ksum.shape[2]
        m_row = (lengths // s - 1).clamp_min(0)  # complete windows of 2 chunks per row
        mw = max(nc - 1, 0)
        kc, bc = kc_buf[:, :, :mw], bc_buf[:, :, :mw]
        wvalid = torch.arange(mw, device=lengths.device) < m_row[..., None]
        sc = head_scores(ctx.q, kc, ctx.scale).masked_fill(~wvalid[:, :, None], float("-inf"))
        qa_score = torch.nan_to_num_(torch.softmax(sc, dim=-1), nan=0.0).sum(2)
        r = blk // s
        nb = int(nb_row.max())
        q_blk = _pool_windows(qa_score.masked_fill(~wvalid, float("-inf")), r, nb)
        b_blk = _pool_windows(bc.masked_fill(~wvalid, float("-inf")), r, nb)
        u = torch.arange(nb, device=lengths.device)
        invalid = u >= nb_row[..., None]
        forced = ((u < n_init) | (u >= (nb_row - n_win)[..., None])) & ~invalid
        qa_idx, qa_ok = select_topk(q_blk, n_init + n_win + kq, forced=forced, invalid=invalid)
        qa = torch.zeros_like(invalid).scatter_(2, qa_idx, qa_ok)
        fidx, fok = select_topk(b_blk, k, forced=qa, invalid=invalid)
        return fidx, fok, qa, blk

    def select(self, ctx: DecodeContext) -> Selection | None:
        """Token indices of ``F`` per row. Sequences whose budgets give different block geometries are
        selected group by group (one pass per distinct geometry), so a row never depends on the batch."""
        lengths = ctx.cache.lengths
        tok = row_tokens(self.resolved_budget, lengths, ctx.layer)
        dense = tok >= lengths
        if bool(dense.all()):
            return None
        per_seq = tok.min(-1).values.tolist()  # one geometry per sequence (its smallest head budget)
        groups: dict[tuple[int, ...], list[int]] = {}
        for b, t in enumerate(per_seq):
            groups.setdefault(self.sizes(int(t)), []).append(b)
        full = torch.arange(ctx.cache.max_length, device=lengths.device).expand(*lengths.shape, -1)
        parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        for rows in groups.values():
            out = self.select_blocks(ctx, int(per_seq[rows[0]]))
            if out is None:
                parts.append((rows, full, full < lengths[..., None]))
            else:
                idx, ok = blocks_to_tokens(out[0], out[1], out[3], lengths)
                parts.append((rows, idx, ok))
        width = max([p[1].shape[-1] for p in parts] + ([full.shape[-1]] if bool(dense.any()) else []))
        index = torch.zeros(*lengths.shape, width, dtype=torch.long, device=lengths.device)
        valid = torch.zeros(*lengths.shape, width, dtype=torch.bool, device=lengths.device)
        for rows, idx, ok in parts:
            r = torch.tensor(rows, device=lengths.device)
            index[r, :, : idx.shape[-1]] = idx[r]
            valid[r, :, : ok.shape[-1]] = ok[r]
        if bool(dense.any()):  # rows whose budget covers them read every entry
            d = dense[..., None]
            fw = full.shape[-1]
            index[..., :fw] = torch.where(d, full, index[..., :fw])
            valid[..., :fw] = torch.where(d, full < lengths[..., None], valid[..., :fw])
            valid[..., fw:] &= ~d
        w = int(valid.sum(-1).max())
        return Selection(index=index[..., :w].contiguous(), valid=valid[..., :w].contiguous())


def _grow(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[2] >= n:
        return x
    extra = max(n - x.shape[2], 16, x.shape[2] // 16)
    pad = (0, 0, 0, extra) if x.dim() == 4 else (0, extra)
    return F.pad(x, pad)


def _window_means(
    st: dict[str, Any], key: str, ksum: torch.Tensor, bsum: torch.Tensor, s: int, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means ``(ksum[j] + ksum[j + 1]) / (2·s)`` over the whole chunk-sum buffers (keys, importances).

    Kept in ``st`` next to the sums: while the sum buffers are the same tensors (updated in place) only the
    windows over the changed chunks ``[lo, hi]`` (windows ``lo − 1 … hi``) are recomputed, with the same
    element-wise operation, so the values are those of a full recomputation; a new buffer (rebuilt or grown
    sums) recomputes all.
    """
    src = st.get(f"{key}_kc_src")
    kc, bc = st.get(f"{key}_kc"), st.get(f"{key}_bc")
    if src is not ksum or not isinstance(kc, torch.Tensor) or not isinstance(bc, torch.Tensor):
        kc = (ksum[:, :, :-1] + ksum[:, :, 1:]) / (2 * s)
        bc = (bsum[:, :, :-1] + bsum[:, :, 1:]) / (2 * s)
        st.update({f"{key}_kc_src": ksum, f"{key}_kc": kc, f"{key}_bc": bc})
        return kc, bc
    a, e = max(lo - 1, 0), min(hi + 1, kc.shape[2])  # windows [a, e)
    if a < e:
        torch.div(ksum[:, :, a:e] + ksum[:, :, a + 1 : e + 1], 2 * s, out=kc[:, :, a:e])
        torch.div(bsum[:, :, a:e] + bsum[:, :, a + 1 : e + 1], 2 * s, out=bc[:, :, a:e])
    return kc, bc


def _chunk_sums(cache: LayerCache, s: int, bias: torch.Tensor, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = cache.keys().float()
    b, hk, n, d = k.shape
    valid = torch.arange(n, device=k.device) < cache.lengths[..., None]
    k = k * valid[..., None]
    bias = bias * valid
    pad = nc * s - n
    ksum = F.pad(k, (0, 0, 0, pad)).view(b, hk, nc, s, d).sum(3)
    bsum = F.pad(bias, (0, pad)).view(b, hk, nc, s).sum(3)
    return _grow(ksum, nc + 16), _grow(bsum, nc + 16)


def _pool_windows(x: torch.Tensor, r: int, nb: int) -> torch.Tensor:
    """Max over the ``r + 1`` windows ``[u·r − 1, u·r + r − 1]`` overlapping each block → ``[B, Hk, nb]``."""
    m = x.shape[-1]
    total = nb * r + 1
    padded = F.pad(x, (1, max(total - 1 - m, 0)), value=float("-inf"))[..., :total]
    return padded.unfold(-1, r + 1, r).amax(-1)
