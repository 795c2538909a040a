"""RazorAttention — retrieval heads keep the whole cache; the others keep sinks, a recent window and one
compensation token.

Tang, Lin, Lin, Han, Hong, Yao, Wang. *RazorAttention: Efficient KV Cache Compression Through Retrieval
Heads.* ICLR 2025, arXiv 2407.15891. Head identification: :mod:`mpckv.calibrate.razor`
(``mpckv calibrate razorattention``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mpckv.calibrate import shipped_file
from mpckv.calibrate.razor import check_heads, load_heads
from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.methods.allocators import budget_entry_tokens
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import check_choice
from mpckv.registry import register_method

COMPENSATIONS = ("mean", "none")
DECODES = ("grow", "slide")


def _matches(path: Path, signature: dict[str, Any]) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("config") == signature)
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=32)
def _cached_heads(
    path: str, stamp: tuple[int, int], num_layers: int, kv_heads: int
) -> frozenset[tuple[int, int]]:
    return load_heads(path, num_layers, kv_heads)


def _heads_from_file(path: str, num_layers: int, kv_heads: int) -> frozenset[tuple[int, int]]:
    try:
        st = Path(path).stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (-1, -1)  # load_heads reports the missing file
    return _cached_heads(path, stamp, num_layers, kv_heads)


@register_method("razorattention")
@dataclass(kw_only=True)
class RazorAttention(KVMethod):
    """Head-wise static compression at the end of prefill; decode grows (default) or slides the window.

    For a non-retrieval KV head holding ``N`` entries, with sinks ``N0`` and recent window ``L_h``: if
    ``N ≤ N0 + L_h`` nothing changes; otherwise the first ``N0`` and the last ``L_h`` entries are kept and
    the ``|D| = N − N0 − L_h`` entries between them are replaced by one compensation entry whose key and
    value are the means of theirs (post-RoPE keys). Retrieval KV heads keep everything, so the rows of one
    layer have different lengths.

    Parameters
    ----------
    heads:
        The retrieval heads: ``"auto"`` (default — the shipped calibration whose model architecture matches,
        see ``mpckv/assets/calibration``), the path of a file written by ``mpckv calibrate razorattention``,
        a list of ``[layer, kv_head]`` pairs, or ``"none"``.
    sinks:
        ``N0`` (paper: 4).
    min_window, compression:
        Without a budget ``L_h = max(min_window, ⌊N / compression⌋)``.
    compensation:
        ``"mean"`` (one averaged entry) or ``"none"`` (dropped entries are simply gone).
    decode:
        ``"grow"`` (paper: decode appends to every head, the window grows) or ``"slide"`` (the card's
        optional extension: a non-retrieval head never holds more than ``N0 + 1 + L_h`` entries; before
        each append the oldest window entry is folded into the compensation entry with a running mean
        and count, or simply dropped with ``compensation="none"``; a head that was not compressed at
        prefill starts sliding once it reaches that size, its first window entry becoming the
        compensation entry with count 1).
    budget:
        Entries kept by a non-retrieval head (sinks + compensation + window): ``L_h = budget − N0 − 1``
        (at least 1); a ratio is of the prompt length.

    Notes
    -----
    Deviations: (1) the compensation entry is attended like any other (the MindSpore deploy cell's form);
    the paper's count weighting (a ``log |D|`` logit bias on that slot) needs a per-entry logit bias in
    the decode attention, which the engine does not have yet. (2) It carries the position of the first
    dropped token (unique, in range); its key is already rotated, so the position is only a label.
    (3) Decode: by default the window grows (paper), nothing is re-folded; ``decode="slide"`` is the
    card's optional sliding window. (4) Budget semantics as above (the paper
    uses ``max(S0, N/C)``; S0 and C are config fields here).

    Under MPC (``ctx.xp.secure``) the same pattern is applied by public index in
    :mod:`mpckv.protocols.razor_secure`: a layer's KV heads are split into two secure caches (retrieval
    heads full, the others short) that attend separately, so the short heads really cost less.
    """

    heads: Any = "auto"
    sinks: int = 4
    min_window: int = 256
    compression: float = 5.0
    compensation: str = "mean"
    decode: str = "grow"

    family = "eviction"
    paper = "Tang et al., ICLR 2025 (arXiv 2407.15891)"
    secure = "yes"
    secure_note: ClassVar[str] = (
        "public pattern (shipped head calibration, window, lengths): a layer's KV heads split into two "
        "secure caches (retrieval heads full, the others sinks + window + a secret mean), attended apart"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.min_window < 1 or not self.compression >= 1.0:
            raise ConfigError(
                "razorattention needs sinks >= 0, min_window >= 1 and compression >= 1, got "
                f"{self.sinks}, {self.min_window}, {self.compression}"
            )
        check_choice("razorattention", "compensation", self.compensation, COMPENSATIONS)
        check_choice("razorattention", "decode", self.decode, DECODES)
        if not isinstance(self.heads, str | list | tuple):
            raise ConfigError(
                f"razorattention: heads must be 'auto', 'none', a path or a list, got {self.heads!r}"
            )

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        self.retrieval_heads(config)

    def retrieval_heads(self, config: ModelConfig) -> frozenset[tuple[int, int]]:
        """The ``(layer, kv_head)`` pairs that keep their whole cache for a model of ``config``."""
        layers, hk = config.num_hidden_layers, config.num_key_value_heads
        if isinstance(self.heads, list | tuple):
            return check_heads(self.heads, layers, hk)
        if self.heads == "none":
            return frozenset()
        if self.heads == "auto":
            found = shipped_file("razorattention_", ".json", config, _matches)
            if found is None:
                raise ConfigError(
                    "razorattention: no shipped calibration for this model; run `mpckv calibrate "
                    "razorattention --model M --out heads.json` and pass --param heads=heads.json"
                )
            return _heads_from_file(str(found), layers, hk)
        return _heads_from_file(str(Path(self.heads).resolve()), layers, hk)

    def window(self, n: int, layer: int, head: int) -> int:
        """Recent window ``L_h`` for a prompt of ``n`` tokens."""
        if self._budget is None:
            return max(self.min_window, math.floor(n / self.compression))
        extra = 1 if self.compensation == "mean" else 0
        return max(1, budget_entry_tokens(self._budget, n, layer, head) - self.sinks - extra)

    def on_prefill(self, ctx: PrefillContext) -> None:
        if ctx.xp is not None and ctx.xp.secure:  # public pattern: split the heads by public index
            from mpckv.protocols.razor_secure import razor_prefill

            razor_prefill(self, ctx)
            return
        cache = ctx.cache
        b, hk = cache.batch, cache.kv_heads
        dev = cache.lengths.device
        chosen = self.retrieval_heads(ctx.config)
        retrieval = torch.tensor([(ctx.layer, h) in chosen for h in range(hk)], device=dev)
        windows = torch.tensor(
            [[self.window(int(n), ctx.layer, h) for h in range(hk)] for n in ctx.prompt_lengths.tolist()],
            dtype=torch.long,
            device=dev,
        )
        n = cache.lengths
        n0 = self.sinks
        squeeze = (~retrieval[None, :]) & (n > n0 + windows)  # [B, Hk]
        comp = 1 if self.compensation == "mean" else 0
        if self.decode == "slide":  # what before_append needs: head classes, caps, compensation counts
            ctx.state["razor_slide"] = {
                "retrieval": retrieval,
                "caps": n0 + comp + windows,
                "count": torch.where(squeeze & bool(comp), n - n0 - windows, 0),
            }
        if not bool(squeeze.any()):
            return
        new_len = torch.where(squeeze, n0 + comp + windows, n)
        kmax = int(new_len.max())
        col = torch.arange(kmax, device=dev)
        tail_start = (n - windows)[..., None]
        src = torch.where(col < n0 + comp, col, tail_start + (col - n0 - comp))
        src = torch.where(squeeze[..., None], src, col.expand(b, hk, kmax))
        valid = col < new_len[..., None]
        if comp:
            full = torch.arange(cache.max_length, device=dev)
            dropped = squeeze[..., None] & (full >= n0) & (full < tail_start)
            count = dropped.sum(-1, keepdim=True).clamp_min(1)[..., None].to(cache.dtype)
            w = dropped[..., None].to(cache.dtype)
            k_mean = (cache.keys() * w).sum(2, keepdim=True) / count
            v_mean = (cache.values() * w).sum(2, keepdim=True) / count
        cache.compact(torch.where(valid, src, torch.zeros_like(src)), valid)
        if comp:
            slot = (squeeze[..., None] & (torch.arange(cache.capacity, device=dev) == n0))[..., None]
            cache.k = torch.where(slot, k_mean, cache.k)
            cache.v = torch.where(slot, v_mean, cache.v)

    def before_append(self, ctx: DecodeContext) -> None:
        """``decode="slide"``: make room in every full non-retrieval row (see the class docstring)."""
        if ctx.xp is not None and ctx.xp.secure:  # also runs a split deferred from the prefill
            from mpckv.protocols.razor_secure import razor_before_append

            razor_before_append(self, ctx)
            return
        if self.decode != "slide":
            return
        st = ctx.state.get("razor_slide")
        if st is None:
            raise ConfigError("razorattention: decode before its prefill hook ran (no slide state)")
        cache = ctx.cache
        full = (~st["retrieval"][None, :]) & (cache.lengths >= st["caps"])  # [B, Hk]
        if not bool(full.any()):
            return
        n0, comp = self.sinks, self.compensation == "mean"
        count = st["count"]
        pos = cache.positions()
        col = torch.arange(pos.shape[-1], device=pos.device)
        window = (col >= n0 + int(comp)) & (col < cache.lengths[..., None])
        oldest = pos.masked_fill(~window, torch.iinfo(torch.long).max).argmin(-1)  # [B, Hk]
        if comp:
            count = torch.where(full & (count == 0), 1, count)  # slot n0 becomes the compensation entry
            c = count.to(cache.dtype)[..., None]
            for name in ("k", "v"):
                t = getattr(cache, name)
                old = torch.gather(t, 2, oldest[..., None, None].expand(-1, -1, 1, t.shape[-1]))[:, :, 0]
                folded = (t[:, :, n0] * c + old) / (c + 1)
                t[:, :, n0] = torch.where(full[..., None], folded, t[:, :, n0])
            st["count"] = torch.where(full, count + 1, count)
        cache.remove_one(torch.where(full, oldest, -1))
