"""VidKV — 1.x-bit KV cache: mixed 2-bit / FFT + 1-bit keys per channel, 1.58-bit (ternary) values.

Tao, You, Sui, Qin, Wang. *Plug-and-Play 1.x-Bit KV Cache Quantization for Video Large Language Models.*
arXiv 2503.16257 (2025); official code KD-TAO/VidKV (``vidkv_quant.py``, ``cache_utils.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.allocators import budget_entry_tokens
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import window_votes
from mpckv.plaintext.methods.topk import select_topk
from mpckv.plaintext.storage.channel_codecs import FFTSignKeys, TernaryValues
from mpckv.plaintext.storage.quant import TERNARY
from mpckv.plaintext.storage.quantized_cache import QuantizedLayerCache
from mpckv.registry import register_method

PROTECTED = "vidkv_protected"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def channel_split(keys: torch.Tensor, lengths: torch.Tensor, n_hi: int) -> torch.Tensor:
    """Channel order ``[B, Hk, d]``: the ``n_hi`` channels with the largest range ``max − min`` over the live
    keys first (ascending channel index), then the others (ascending)."""
    b, hk, n, d = keys.shape
    live = (torch.arange(n, device=keys.device)[None, None, :] < lengths[..., None])[..., None]
    kf = keys.float()
    rng = torch.where(live, kf, float("-inf")).amax(2) - torch.where(live, kf, float("inf")).amin(2)
    rng = torch.nan_to_num(rng, nan=0.0, posinf=0.0, neginf=0.0)
    top = torch.zeros(b, hk, d, dtype=torch.bool, device=keys.device)
    if n_hi:
        top.scatter_(-1, torch.topk(rng, n_hi, dim=-1, sorted=False).indices, True)
    ch = torch.arange(d, device=keys.device).expand(b, hk, d)
    order = torch.sort((~top).to(torch.int8) * d + ch, dim=-1).indices  # top first, index order within
    return order


@register_method("vidkv")
@dataclass(kw_only=True)
class VidKV(KVMethod):
    """Quantize every entry outside a full-precision budget to 1.x bits, per channel in token groups.

    Budget: the full-precision tokens per (sequence, KV head) — ``k`` = the budget's tokens (default 128,
    the release's ``residual_length``), of which ``⌊protect_fraction·k⌋`` are *protected* salient prompt
    tokens and the rest the most recent tokens (the residual). Older non-protected tokens are quantized in
    groups of ``group_size`` consecutive tokens once the residual holds ``k_r + group_size`` of them (KIVI
    style: only the new group is quantized, nothing is re-quantized). A budget at least as long as the
    sequence keeps everything in full precision (exactly dense).

    Keys: the ``⌊(key_bits − 1)·d⌋`` channels with the largest range on the prompt (per sequence and KV head,
    fixed after prefill) get 2-bit asymmetric RTN per (channel, group); the rest a real FFT along the
    channels and 1 bit per coefficient (:class:`~mpckv.plaintext.storage.channel_codecs.FFTSignKeys`).
    Values: ternary ``{−s, 0, s}`` with ``s = mean|v|`` per (channel, group), or 2-bit (``value_bits=2``).
    Scores use the query's FFT (Parseval), so no key is ever inverse-transformed at decode time.

    Parameters
    ----------
    key_bits:
        Average key bits in [1, 2] (paper: 1.5).
    value_bits:
        1.58 (ternary) or 2.
    group_size:
        Tokens per quantization group (paper: 32).
    protect_fraction:
        Share of the full-precision budget given to salient prompt tokens (paper's STP ratio: 0.2).

    Notes
    -----
    Video-specific parts and what applies to text models: semantic token protection (STP) scores *visual*
    tokens by their similarity to the text-token embeddings and adds a model-specific offset of 14 system
    tokens — neither exists for a text model; we protect the prompt tokens with the largest accumulated
    prefill attention (the column sums of all prompt queries, as H2O) instead. The per-channel *value*
    quantization is the paper's finding for video LLMs (redundant visual tokens); it may not hold for text
    (the card suggests per-token values as an option — not implemented). The 1.x-bit key scheme and the
    ternary values are modality-agnostic.

    Our deviations (and fixes of the released code, per the card): 1-bit dequantization is ``s·(2b − 1)``
    (the release returns ``s·b``), ternary dequantization multiplies by the scale (the release omits it),
    the FFT is a real FFT with ``e`` free coefficients (the release's complex FFT stores ``2e``, i.e. 2 bits
    per channel), only new groups are quantized (the release re-quantizes the whole cache every 128 tokens
    and re-splits the channels), the channel split is per sequence and KV head (release: one per layer),
    protected tokens stay in full precision (release: 2-bit values), and the full-precision residual is the
    budget (release: ``N mod 32`` leftover tokens at prefill, up to 128 during decode).
    """

    key_bits: float = field(default=1.5, metadata={"min": 1.0, "max": 2.0})
    value_bits: float = 1.58
    group_size: int = field(default=32, metadata={"min": 1})
    protect_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    param_dtype: Literal["float16", "float32"] = "float16"

    family = "quantization"
    paper = "Tao et al., arXiv 2503.16257 (2025)"
    secure = "no"
    secure_note = "quantized storage is plaintext only; FFT/sign/ternary steps would need MPC comparisons"
    default_budget = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value_bits not in (TERNARY, 2):
            raise ConfigError(f"vidkv: value_bits must be 1.58 (ternary) or 2, got {self.value_bits!r}")

    def split(self, prompt_len: int, layer: int = 0, head: int = 0) -> tuple[int, int]:
        """``(k, protected)`` full-precision tokens and protected ones for a prompt of ``prompt_len``."""
        k = max(1, budget_entry_tokens(self.resolved_budget, prompt_len, layer, head))
        return k, min(k - 1, math.floor(self.protect_fraction * k + 1e-9))

    def on_prefill(self, ctx: PrefillContext) -> None:
        cache = ctx.cache
        if isinstance(cache, QuantizedLayerCache):
            raise ConfigError("vidkv must be the first storage format of a layer")
        dev = cache.lengths.device
        splits = [
            [self.split(int(n), ctx.layer, h) for h in range(cache.kv_heads)]
            for n in ctx.prompt_lengths.tolist()
        ]
        both = torch.tensor(splits, dtype=torch.long, device=dev)  # [B, Hk, 2]
        k, protect = both[..., 0], both[..., 1]
        ctx.state["recent"] = (k - protect).contiguous()
        flag = cache.add_meta(PROTECTED)
        if bool((protect > 0).any()) and bool((cache.lengths > k).any()):
            sal = window_votes(ctx, ctx.q.shape[2], "sum")
            col = torch.arange(cache.max_length, device=dev)
            recent = col >= (cache.lengths - (k - protect))[..., None]
            invalid = ~cache.valid() | recent  # the recent tokens are in full precision anyway
            idx, val = select_topk(sal, protect, None, invalid)
            flag.scatter_(2, torch.where(val, idx, 0), val.float())
        d = cache.head_dim
        n_hi = min(d, math.floor((self.key_bits - 1.0) * d + 1e-9))
        pdt = _DTYPES[self.param_dtype]
        perm = channel_split(cache.keys(), cache.lengths, n_hi)
        kc = FFTSignKeys(self.group_size, perm, n_hi, pdt)
        vc = TernaryValues(self.group_size, d, TERNARY if self.value_bits == 1.58 else 2, pdt)
        qc = QuantizedLayerCache(cache, kc, vc)
        ctx.replace_cache(qc)
        self._quantize_old(ctx)

    def _quantize_old(self, ctx: PrefillContext | DecodeContext) -> None:
        qc = ctx.cache
        assert isinstance(qc, QuantizedLayerCache)
        hi, g = qc.hi, self.group_size
        cand = hi.valid() & (hi.meta[PROTECTED][:, :, : hi.max_length] == 0)
        n_cand = cand.sum(-1)
        extra = n_cand - ctx.state["recent"]
        n_dem = torch.where(extra >= g, (extra // g) * g, torch.zeros_like(extra))
        if int(n_dem.max()) == 0:
            return
        order = torch.sort((~cand).to(torch.int8), dim=-1, stable=True).indices  # candidates, oldest first
        kmax = int(n_dem.max())
        index = order[..., :kmax]
        valid = torch.arange(kmax, device=index.device)[None, None, :] < n_dem[..., None]
        qc.demote(index, valid)

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        if not isinstance(ctx.cache, QuantizedLayerCache):
            raise ConfigError("vidkv: the layer cache is not a quantized cache (was on_prefill skipped?)")
        self._quantize_old(ctx)
