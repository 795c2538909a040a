"""StreamingLLM — attention sinks plus a sliding window.

Xiao, Tian, Chen, Han, Lewis. *Efficient Streaming Language Models with Attention Sinks.* ICLR 2024,
arXiv 2309.17453.

The cache keeps the first ``sinks`` tokens and the ``window`` most recent ones; nothing is scored. At the
end of prefill the prompt is cut to ``sinks + window`` entries; at every decode step the oldest non-sink
entry is evicted *before* the new one is appended, so the cache never exceeds ``sinks + window``.

Cost: the prompt is cut once (one compaction); each decode step then evicts the oldest non-sink entry with
:meth:`~mpckv.plaintext.kv_cache.LayerCache.remove_one`, which moves the row's last entry into the freed
slot (O(d) per row) instead of compacting (copying) the whole window every step. The cache therefore does
not keep its entries in position order; attention does not depend on the order. Under MPC (secure caches)
the per-step compaction by public index is kept.

Deviations: keys keep their original positions (kvpress's default and ``positions="original"`` in the
card); the paper's in-cache positions (re-rotating keys) are not implemented yet. The budget, when given,
sets ``window = budget − sinks`` per sequence (a ratio is of the prompt length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    sinks: int = field(default=4, metadata={"min": 0})
    window: int = field(default=2000, metadata={"min": 1})

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
        if isinstance(cache, LayerCache):
            if bool((lengths <= cap + 1).all()):  # one entry too many: O(d) eviction of the oldest
                cache.remove_one(torch.where(lengths > cap, self._oldest(cache), -1))
                return
            self._sort_by_position(cache)  # remove_one reorders entries; the cut below expects order
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

    def _oldest(self, cache: LayerCache) -> torch.Tensor:
        """Slot ``[B, Hk]`` of the oldest non-sink live entry of every row."""
        pos = cache.positions()
        col = torch.arange(pos.shape[-1], device=pos.device)
        out = (col < self.sinks) | (col >= cache.lengths[..., None])
        return pos.masked_fill(out, torch.iinfo(torch.long).max).argmin(-1)

    @staticmethod
    def _sort_by_position(cache: LayerCache) -> None:
        valid = cache.valid()
        key = cache.positions().masked_fill(~valid, torch.iinfo(torch.long).max)
        if bool((key[..., 1:] >= key[..., :-1]).all()):
            return
        order = torch.sort(key, dim=-1, stable=True).indices
        cache.compact(order, torch.gather(valid, 2, order))

    def on_prefill(self, ctx: PrefillContext) -> None:
        # ratios are of the entries present now (== the prompt unless an earlier composed part evicted)
        present = ctx.cache.lengths.amax(dim=1)
        caps = torch.tensor([self.capacity(int(n)) for n in present.tolist()])
        ctx.state["caps"] = caps
        self._keep_pattern(ctx.cache, caps)
        self._start_ring(ctx.cache, ctx.state, caps)

    def before_append(self, ctx: DecodeContext) -> None:
        # make room for one entry: keep at most cap - 1 before the append
        cache, st = ctx.cache, ctx.state
        ring = st.get("ring")
        if ring is not None and st.get("ring_version") == cache.version:
            # after our last before_append the engine appended one entry (none after the prefill)
            n, cap = st["ring_length"] + int(st["ring_appended"]), st["ring_cap"]
            if n >= cap:  # evict the oldest non-sink entry: a ring over slots [sinks, cap - 1)
                span = cap - 1 - self.sinks
                cache.remove_slot(self.sinks + ring % span if span > 0 else cap - 1, length=n)
                st["ring"], n = ring + 1, cap - 1
            st.update(ring_length=n, ring_version=cache.version, ring_appended=True)
            return
        st["ring"] = None  # someone else changed the cache: the general path from now on
        self._keep_pattern(cache, st["caps"] - 1)

    def _start_ring(self, cache: LayerCache, st: dict, caps: torch.Tensor) -> None:
        """Enable the O(1) ring eviction when all rows share one length and cap and are in position order.

        Slots ``[0, sinks)`` hold the sinks; once full, slot ``cap - 1`` receives every new entry and
        :meth:`~mpckv.plaintext.kv_cache.LayerCache.remove_slot` moves it into the oldest window slot,
        which walks ``sinks, sinks + 1, …`` cyclically: no scan of positions, one entry moved per step.
        """
        st["ring"] = None
        if not isinstance(cache, LayerCache) or cache.max_length == 0:
            return
        lengths = cache.lengths.flatten().tolist()
        cap_list = caps.tolist()
        if len(set(lengths)) != 1 or len(set(cap_list)) != 1:
            return
        pos = cache.positions()
        if not bool((pos[..., 1:] > pos[..., :-1]).all()):
            return
        st.update(ring=0, ring_length=lengths[0], ring_cap=int(cap_list[0]), ring_version=cache.version)
        st["ring_appended"] = False
