"""PyramidKV — SnapKV votes with a pyramid of per-layer capacities (more in lower layers).

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao. *PyramidKV: Dynamic KV Cache Compression
based on Pyramidal Information Funneling.* arXiv 2406.02069 (official code Zefan-Cai/PyramidKV
``pyramidkv_utils.py``; kvpress ``PyramidKVPress``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpckv.config import ModelConfig
from mpckv.errors import BudgetError, ConfigError
from mpckv.plaintext.methods.allocators import budget_entry_tokens, pyramid_capacities
from mpckv.plaintext.methods.base import PrefillContext
from mpckv.plaintext.methods.snapkv import SnapKV
from mpckv.registry import register_method


@register_method("pyramidkv")
@dataclass(kw_only=True)
class PyramidKV(SnapKV):
    """SnapKV scoring with layer ``l`` of ``L`` keeping ``w + max − l·(max − min)/(L − 1)`` entries.

    With average capacity ``C`` (the budget, window included), ``A = C − w``, ``min = A/β`` and
    ``max = 2A − min``; when ``max ≥ N − w`` it is clamped to ``N − w`` and ``min = 2A − max``. The mean
    capacity over layers is ``C`` and the first layer keeps the most (see
    :func:`~mpckv.plaintext.methods.allocators.pyramid_capacities`).

    Parameters
    ----------
    beta:
        Pyramid steepness ``β`` (paper / official default 20); the top layer keeps ``(C − w)/β`` prefix
        tokens.
    window, kernel_size, pooling, group_reduce:
        As :class:`~mpckv.plaintext.methods.snapkv.SnapKV`.
    budget:
        Average capacity ``C`` per layer (window included): one token count or one ratio of each prompt's
        length (per-layer / per-head budgets are rejected: the pyramid sets them).

    Notes
    -----
    Deviations from the official code: real-valued pyramid (kvpress) with exact rounding so the mean is
    ``C``, instead of integer ``//`` steps (whose mean overshoots ``C``); the clamped pyramid is used for
    every ``N > C`` (the official code switches to uniform SnapKV for ``C ≤ N < 2(C − w)``); ``C < w``
    shrinks the window to ``C``; GQA and ragged batches as in SnapKV.
    """

    beta: float = 20.0

    paper = "Cai et al., arXiv 2406.02069"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"pyramidkv: beta must be positive, got {self.beta}")

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        if self._budget is not None and self._budget.kind not in ("ratio", "tokens"):
            raise BudgetError(
                "pyramidkv takes one ratio or token budget (the pyramid sets per-layer budgets)"
            )

    def layer_capacity(self, prompt_len: int, layer: int, num_layers: int) -> int:
        """Capacity (window included) of ``layer`` for a prompt of ``prompt_len`` tokens."""
        cap = budget_entry_tokens(self.resolved_budget, prompt_len)
        window = min(self.window, cap)
        return pyramid_capacities(cap, window, num_layers, self.beta, prompt_len=prompt_len)[layer]

    def capacities(self, ctx: PrefillContext) -> torch.Tensor:
        caps = [self.layer_capacity(int(n), ctx.layer, ctx.num_layers) for n in ctx.prompt_lengths.tolist()]
        out = torch.tensor(caps, dtype=torch.long, device=ctx.cache.lengths.device)
        return out[:, None].expand(-1, ctx.cache.kv_heads).contiguous()
