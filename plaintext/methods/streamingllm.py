"""StreamingLLM — attention sinks plus a sliding window.

Xiao, Tian, Chen, Han, Lewis. *Efficient Streaming Language Models with Attention Sinks.* ICLR 2024,
arXiv 2309.17453.

The cache keeps the first ``sinks`` tokens and the ``window`` most recent ones; nothing is scored. At the
end of prefill the prompt is cut to ``sinks + window`` entries; at every decode step the oldest non-sink
entry is evicted *before* the new one is appended, so the cache never exceeds ``sinks + window``.

Deviations: keys keep their original positions (kvpress's default and ``positions="original"`` in the
card); the paper's in-cache positions (re-rotating keys) are not implemented yet. The budget, when given,
sets ``window = budget − sinks`` per sequence (a ratio is of the prompt length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpckv.config import ModelConfig
from mpckv.errors import BudgetError, ConfigError
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext
from mpckv.registry import register_method


@register_method("streamingllm")
@dataclass(kw_only=True)
class StreamingLLM(KVMethod):
    """Attention sinks + recent window; a public pattern shared by all heads and layers.

    Parameters
    ----------
    sinks:
        Initial tokens always kept (paper: 4).
    window:
        Recent tokens kept when no budget is given (paper demo: 2000).
    """

    sinks: int = 4
    window: int = 2000

    family = "eviction"
    paper = "Xiao et al., ICLR 2024 (arXiv 2309.17453)"
    secure = "yes"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 1:
            raise ConfigError(
                f"streamingllm needs sinks >= 0 and window >= 1, got {self.sinks}, {self.window}"
            )

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        if self._budget is not None and self._budget.kind not in ("ratio", "tokens"):
            raise BudgetError(
                "streamingllm takes one ratio or token budget (the pattern is shared by all heads)"
            )

    def capacity(self, prompt_len: int) -> int:
        """Total kept entries (sinks + window) for a prompt of ``prompt_len`` tokens."""
        if self._budget is None:
            return self.sinks + self.window
        if self._budget.kind == "tokens":  # an absolute capacity also bounds the decode-time growth
            return max(int(self._budget.value), self.sinks + 1)
        return max(self._budget.tokens_for(prompt_len), self.sinks + 1)

    def _keep_pattern(self, cache: LayerCache, caps: torch.Tensor) -> None:
        lengths = cache.lengths  # [B, Hk]
        cap = caps.to(lengths.device)[:, None].expand_as(lengths)
        if bool((lengths <= cap).all()):
            return
        new_len = torch.minimum(lengths, cap)
        kmax = int(new_len.max())
        col = torch.arange(kmax, device=lengths.device)
        recent = cap - self.sinks
        # columns [0, sinks) are sinks; the rest map to the last `recent` entries of the row
        src = torch.where(col < self.sinks, col, lengths[..., None] - recent[..., None] + (col - self.sinks))
        keep_all = lengths <= cap
        src = torch.where(keep_all[..., None], col.expand_as(src), src)
        valid = col < new_len[..., None]
        cache.compact(torch.where(valid, src, torch.zeros_like(src)), valid)

    def on_prefill(self, ctx: PrefillContext) -> None:
        # ratios are of the entries present now (== the prompt unless an earlier composed part evicted)
        present = ctx.cache.lengths.amax(dim=1)
        caps = torch.tensor([self.capacity(int(n)) for n in present.tolist()])
        ctx.state["caps"] = caps
        self._keep_pattern(ctx.cache, caps)

    def before_append(self, ctx: DecodeContext) -> None:
        # make room for one entry: keep at most cap - 1 before the append
        self._keep_pattern(ctx.cache, ctx.state["caps"] - 1)
