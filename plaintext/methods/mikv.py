"""MiKV — keep the entries an eviction policy would drop, in low precision ("No Token Left Behind").

Yang, Kim, Bae, Kwon, Park, Yang, Kwon, Lee. *No Token Left Behind: Reliable KV Cache Compression via
Importance-Aware Mixed Precision Quantization.* arXiv 2402.18096 (2024). No official code was found; the
formulas follow the paper as summarised in the spec card (shared/methods/mikv.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext, PrefillContext
from mpckv.plaintext.methods.h2o import H2O, SCORE
from mpckv.plaintext.methods.scorers import reduce_group
from mpckv.plaintext.methods.topk import select_topk
from mpckv.plaintext.storage.quantized_cache import QuantizedLayerCache, TokenRTN
from mpckv.registry import register_method

PENDING = "mikv_pending"  # hi-store metadata: 1 = chosen for demotion, not moved yet

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def channel_balancer(
    q: torch.Tensor, k: torch.Tensor, q_len: torch.Tensor, k_len: torch.Tensor
) -> torch.Tensor:
    """MiKV's outlier balancer ``b_c = sqrt(max_t |q_t,c| / max_t |k_t,c|)`` per (sequence, KV head,
    channel) ``[B, Hk, d]``: ``q [B, H, T, d]`` (max over the prompt and the GQA group), ``k [B, Hk, L, d]``
    (max over the live keys). Channels where either maximum is 0 get ``b = 1``. With ``k̃ = k ⊙ b`` and
    ``q̃ = q ⊘ b``, ``q̃·k̃ = q·k`` exactly before quantization."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    qm = torch.arange(t, device=q.device)[None, :] < q_len.to(q.device)[:, None]  # [B, T]
    mq = torch.where(qm[:, None, :, None], q.float().abs(), 0.0).amax(2)  # [B, H, d]
    mq = mq.view(b, hk, h // hk, d).amax(2)
    km = torch.arange(k.shape[2], device=k.device)[None, None, :] < k_len[..., None]
    mk = torch.where(km[..., None], k.float().abs(), 0.0).amax(2)  # [B, Hk, d]
    ok = (mq > 0) & (mk > 0)
    ratio = torch.where(ok, mq / torch.where(ok, mk, torch.ones_like(mk)), torch.ones_like(mq))
    return ratio.sqrt().clamp(1e-4, 1e4)


def _demote_where(qc: QuantizedLayerCache, mask: torch.Tensor) -> None:
    """Demote the full-precision entries where ``mask [B, Hk, n]`` is set, in slot order."""
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    top = int(mask.sum(-1).max()) if mask.numel() else 0
    if top:
        qc.demote(order[..., :top], mask.gather(2, order[..., :top]))


@register_method("mikv")
@dataclass(kw_only=True)
class MiKV(H2O):
    """H2O's importance policy, but the entries H2O evicts are *demoted* to ``low_bits`` instead of dropped.

    Budget: the high-precision set per (sequence, KV head) — exactly H2O's kept set (``k = k_h + k_r``:
    heavy hitters by accumulated attention + a recent window; see :class:`~.h2o.H2O` for the budget and
    ratio parameters). Everything else lives in a packed low-bit store (per-token asymmetric round to
    nearest, one scale + zero per ``group_size`` channels), and every entry takes part in attention.
    Decode: the new token enters the high-precision store; accumulated scores are updated from the
    attention over *both* stores; when the high-precision set exceeds ``k``, its lowest-scoring non-recent
    entry is quantized and moved (irreversible). Keys are balanced per channel before quantization
    (:func:`channel_balancer`, computed once on the prompt, applied as ``q ⊘ b`` at attention).

    Parameters
    ----------
    low_bits:
        Bits of the low-precision store: 1, 2, 3, 4 or 8. ``0`` drops instead (exactly H2O); ``16`` keeps
        everything in full precision (exactly dense).
    group_size:
        Channels per scale/zero (``0``: the whole head, one pair per token and head). Must divide
        ``head_dim``.
    balance:
        Apply the outlier balancer to the keys.
    symmetric:
        Symmetric codes (scale only) instead of asymmetric (scale + zero).
    param_dtype:
        Storage dtype of scales and zeros (rounded outwards so the error bound holds).
    demote_every:
        Decode steps per physical demotion. Every step still *chooses* the entry to demote (the same rule,
        the chosen ones leave the ranking at once), but the chosen entries stay in the full-precision store,
        flagged, until ``demote_every`` of them have gathered; they are then quantized and moved together.
        ``1`` quantizes each entry on the step it is chosen (the paper's schedule). Ignored when
        ``low_bits`` is 0 (eviction must take effect at once to be H2O) or 16.

    Notes
    -----
    Fused attention (no full-precision copy): CPU folds the scales into the dot products, CUDA runs
    :mod:`mpckv.kernels.quant_attention` (1/2/4/8 bits; 3 bits dequantizes). Our deviations: the
    high-precision store is the model dtype (the paper: FP16 or INT8; INT8 not implemented); balancer
    statistics come from the whole prompt, per sequence and KV head (max over the GQA group); importance is
    H2O's (not pluggable yet); decode-time demotion is applied in blocks of ``demote_every`` steps (see the
    parameter: quantizing one token per layer per step costs ~40 small tensor operations, more than the
    attention it saves at 8K tokens on CPU; up to ``demote_every − 1`` already-demoted entries per head are
    read at full precision meanwhile, the choices are unchanged); scores count the attention to low-precision
    entries in the softmax denominator but only high-precision entries are ranked (no promotion, as the card
    says).
    """

    low_bits: Literal[0, 1, 2, 3, 4, 8, 16] = 4
    group_size: int = field(default=0, metadata={"min": 0})
    balance: bool = True
    symmetric: bool = False
    param_dtype: Literal["float16", "float32"] = "float16"
    demote_every: int = field(default=32, metadata={"min": 1})

    family = "quantization"
    paper = "Yang et al., arXiv 2402.18096 (2024)"
    secure = "no"
    secure_note = (
        "quantized storage is plaintext only; under MPC it would need per-token min/max and rounding"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric and self.low_bits == 1:
            raise ConfigError("mikv: symmetric codes need low_bits >= 2")

    # ------------------------------------------------------------------ storage
    def _install(self, ctx: PrefillContext | DecodeContext) -> QuantizedLayerCache:
        cache = ctx.cache
        if isinstance(cache, QuantizedLayerCache):
            return cache
        if not isinstance(ctx, PrefillContext):
            raise ConfigError("mikv: the quantized store is installed at prefill")
        d = cache.head_dim
        group = self.group_size or d
        if d % group:
            raise ConfigError(f"mikv: group_size {group} must divide head_dim {d}")
        bits = max(self.low_bits, 1)
        pdt = _DTYPES[self.param_dtype]
        bal = (
            channel_balancer(ctx.q, cache.keys(), ctx.prompt_lengths, cache.lengths) if self.balance else None
        )
        kc = TokenRTN(bits, group, d, symmetric=self.symmetric, param_dtype=pdt, balance=bal)
        vc = TokenRTN(bits, group, d, symmetric=self.symmetric, param_dtype=pdt)
        qc = QuantizedLayerCache(cache, kc, vc, drop=self.low_bits == 0)
        ctx.replace_cache(qc)
        return qc

    def _evict(self, ctx: PrefillContext | DecodeContext) -> None:
        """Demote (instead of evict) what H2O would evict."""
        if self.low_bits == 16:
            return
        qc = self._install(ctx)
        hi = qc.hi
        k, recent = ctx.state["k"], ctx.state["recent"]
        pending = int(ctx.state.get(PENDING, 0))
        n = hi.max_length
        steady = (hi.lengths == n) & (hi.lengths == k + 1 + pending)
        if isinstance(ctx, DecodeContext) and bool(steady.all()):
            slot = self._lowest(hi, n - recent)  # one entry per row, the decode steady state
            if self._block() == 1:
                qc.demote_one(slot)
                return
            hi.meta[PENDING].scatter_(2, slot[..., None], 1.0)
            pending += 1
            ctx.state[PENDING] = pending
            if pending >= self._block():
                self._flush(ctx, qc)
            return
        if pending:
            self._flush(ctx, qc)
        if bool((hi.lengths <= k).all()):
            return
        col = torch.arange(hi.max_length, device=k.device)
        forced = col >= (hi.lengths - recent)[..., None]
        invalid = ~hi.valid()
        keep_idx, keep_valid = select_topk(self._rank(hi), k, forced & ~invalid, invalid)
        kept = torch.zeros(hi.batch, hi.kv_heads, hi.max_length + 1, dtype=torch.bool, device=k.device)
        kept.scatter_(2, torch.where(keep_valid, keep_idx, hi.max_length), True)
        _demote_where(qc, hi.valid() & ~kept[..., :-1])

    def _block(self) -> int:
        return 1 if self.low_bits == 0 else self.demote_every

    def _flush(self, ctx: PrefillContext | DecodeContext, qc: QuantizedLayerCache) -> None:
        """Quantize and move the flagged (already chosen) entries, then make room for the next block."""
        hi = qc.hi
        _demote_where(qc, (hi.meta[PENDING][:, :, : hi.max_length] > 0) & hi.valid())
        ctx.state[PENDING] = 0
        qc.hi.reserve(qc.hi.max_length + self._block())

    def _lowest(self, hi: LayerCache, first_recent: torch.Tensor) -> torch.Tensor:
        """Slot ``[B, Hk]`` of each full row's lowest-ranked entry outside the recent window: the one entry
        :func:`select_topk` would leave out of ``n − 1`` (NaN lowest, ties to the *higher* index, recent
        entries never), in O(n) without a sort."""
        n = hi.max_length
        rank = torch.nan_to_num(self._rank(hi).float(), nan=float("-inf"))
        rank = rank.clamp(min=torch.finfo(torch.float32).min)
        recent = torch.arange(n, device=rank.device) >= first_recent[..., None]
        rank = rank.masked_fill(recent, float("inf"))
        if PENDING in hi.meta:  # chosen already, waiting for the block's demotion
            rank = rank.masked_fill(hi.meta[PENDING][:, :, :n] > 0, float("inf"))
        return (n - 1) - rank.flip(-1).argmin(-1)  # argmin takes the first minimum: flip for the last

    # ------------------------------------------------------------------ hooks
    def on_prefill(self, ctx: PrefillContext) -> None:
        if self.low_bits == 16:
            return
        super().on_prefill(ctx)  # H2O scores, then self._evict → install + demote
        qc = ctx.cache
        if isinstance(qc, QuantizedLayerCache):
            # room for the entries a block of decode steps adds before they are moved out: the
            # full-precision store then reallocates once per block (demote_one: never, k + 1 slots)
            if self._block() > 1:
                qc.hi.add_meta(PENDING)
            qc.hi.reserve(qc.hi.max_length + self._block())

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        if self.low_bits == 16:
            return
        if probs is None:
            raise ConfigError("mikv needs the decode attention probabilities (needs_decode_probs)")
        qc = ctx.cache
        if not isinstance(qc, QuantizedLayerCache):
            raise ConfigError("mikv: the layer cache is not a quantized cache (was on_prefill skipped?)")
        hi = qc.hi
        n = hi.max_length
        g = probs.shape[1] // hi.kv_heads
        p_hi = probs[..., :n] * hi.valid().repeat_interleave(g, 1)  # logical [hi | lo]: hi comes first
        hi.meta[SCORE][:, :, :n] += reduce_group(p_hi.float(), hi.kv_heads, self.group_reduce)
        if self.normalize:
            hi.meta["h2o_count"][:, :, :n] += hi.valid().float()
        self._evict(ctx)
