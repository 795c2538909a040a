"""KVShare's DHD selector (attention weight × value deviation) at prefill and its decode-time refresh.

Yang et al., "KVShare: An LLM Service System with Efficient and Effective Multi-Tenant KV Cache Reuse",
arXiv 2503.16525. At the check layer, cached row ``j`` scores ``α_j · δ_j`` with ``δ_j = ‖V_fresh[j] −
V_cached[j]‖₁`` (over heads and head dim) and ``α_j`` the column sum of the attention of the fresh rows
(raw segments: question and misses), per-head causal softmaxes averaged over heads; the top
``floor(r · N_cached)`` cached rows are recomputed. During decoding (:meth:`FusedPrefill.generate
<mpckv.plaintext.fusion.recompute.FusedPrefill.generate>`), every step re-scores the rows still reused by
the new token's attention × ``δ`` and recomputes the best ``refresh`` of them in the next forward
(:mod:`mpckv.plaintext.fusion.refresh`, paper setting 3). The cache-hit-aware request scheduler is
:mod:`mpckv.plaintext.fusion.scheduler`.

Deviations: the rolling-hash span matcher is not implemented (our chunks are explicit segments); the check
layer (1) and α's query set (fresh rows) are our choices where the paper is silent; decode refresh runs in
our own decode step (``FusedPrefill.generate``), not inside ``Engine.decode``, and not together with a
post-fusion eviction method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mpckv.plaintext.fusion.a3 import question_attention
from mpckv.plaintext.fusion.selector import FusionMethod, SelectInput, top_cached
from mpckv.registry import register_method


def dhd_delta(inp: SelectInput) -> torch.Tensor:
    """Per-row L1 value deviation ``[N]`` (fp32; zero on rows that are not cached)."""
    delta = (inp.v.float() - inp.v_old.float()).abs().sum(dim=(0, 2))
    return delta * inp.cached.float()


@register_method("kvshare")
@dataclass(kw_only=True)
class KVShare(FusionMethod):
    """KVShare DHD (fusion): recompute the top-r cached rows by attention × L1 value deviation, and
    refresh ``refresh`` more per decode step."""

    refresh: int = field(default=3, metadata={"min": 0})

    paper: ClassVar[str] = "arXiv 2503.16525"

    def choose(self, inp: SelectInput) -> torch.Tensor:
        prompt = inp.prompt
        fresh = (~prompt.cached).nonzero()[:, 0]
        if fresh.numel() == 0:
            fresh = torch.tensor([prompt.num_tokens - 1], device=inp.q.device)
        alpha = question_attention(inp.q[:, fresh], inp.k, prompt.positions[fresh], prompt.positions, False)
        delta = dhd_delta(inp)
        prompt.extras["kvshare_delta"] = delta
        return top_cached(alpha * delta, inp.cached, inp.budget)

    def fused_generate(
        self, engine: Any, fused: Any, max_new_tokens: int, stop_tokens: Sequence[int] | None
    ) -> list[int]:
        """Greedy decoding with ``refresh`` rows recomputed per step (plain decoding when 0)."""
        from mpckv.plaintext.fusion.refresh import generate_with_refresh

        if int(self.refresh) == 0 or fused.prompt is None or fused.post is not None:
            res = engine.continue_generation(fused.session, max_new_tokens, stop_tokens=stop_tokens)
            return list(res.tokens[0])
        return generate_with_refresh(
            engine, fused, max_new_tokens, int(self.refresh), int(self.full_layers), stop_tokens
        )
