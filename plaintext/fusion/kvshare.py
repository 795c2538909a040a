"""KVShare's prefill selector (DHD): attention weight × value deviation.

Yang et al., "KVShare: An LLM Service System with Efficient and Effective Multi-Tenant KV Cache Reuse",
arXiv 2503.16525. At the check layer, cached row ``j`` scores ``α_j · δ_j`` with ``δ_j = ‖V_fresh[j] −
V_cached[j]‖₁`` (over heads and head dim) and ``α_j`` the column sum of the attention of the fresh rows
(raw segments: question and misses), per-head causal softmaxes averaged over heads; the top
``floor(r · N_cached)`` cached rows are recomputed.

Deviations: only the prefill stage of DHD is implemented — the decode-time refresh of ``N`` extra rows per
step, the rolling-hash span matcher (our chunks are explicit segments) and the hit-rate-aware scheduler
are not; the check layer (1) and α's query set (fresh rows) are our choices where the paper is silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mpckv.plaintext.fusion.a3 import question_attention
from mpckv.plaintext.fusion.selector import FusionMethod, SelectInput, top_cached
from mpckv.registry import register_method


@register_method("kvshare")
@dataclass(kw_only=True)
class KVShare(FusionMethod):
    """KVShare DHD (fusion): recompute the top-r cached rows by attention × L1 value deviation."""

    paper: ClassVar[str] = "arXiv 2503.16525"

    def choose(self, inp: SelectInput) -> torch.Tensor:
        prompt = inp.prompt
        fresh = (~prompt.cached).nonzero()[:, 0]
        if fresh.numel() == 0:
            fresh = torch.tensor([prompt.num_tokens - 1], device=inp.q.device)
        alpha = question_attention(inp.q[:, fresh], inp.k, prompt.positions[fresh], prompt.positions, False)
        delta = (inp.v.float() - inp.v_old.float()).abs().sum(dim=(0, 2))
        return top_cached(alpha * delta, inp.cached, inp.budget)
