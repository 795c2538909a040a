"""A³: recompute the cached tokens the question attends to most.

Zhou et al., "A³: Attention-Aware Accurate KV Cache Fusion for Fast Large Language Model Serving",
arXiv 2511.17560. At the check layer the question rows (the trailing raw segment) attend, with one
head-merged softmax (logits ``Σ_h q_h·k_h / sqrt(H·d)``, GQA keys repeated), causally over all rows; a
cached row's score is the column sum over question rows, smoothed by a stride-1 average pool of width
``pool``; the top ``floor(r · N_cached)`` cached rows are recomputed.

Deviations: the candidates are all cached rows (the paper excludes a system-prompt prefix, which our
segments do not distinguish; the budget base is the cached rows, not ``N − n_q``); ``merge_heads=False``
averages per-head softmaxes instead; the eviction extension is the engine's own method applied to the
fused cache (``Engine(model, "a3+snapkv")``). If the prompt ends in a chunk, its last row is the question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.selector import FusionMethod, SelectInput, top_cached
from mpckv.registry import register_method


def question_attention(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, key_pos: torch.Tensor, merge_heads: bool
) -> torch.Tensor:
    """Column sums ``[N]`` of the question rows' attention ``q [H, n_q, d]`` over keys ``k [Hk, N, d]``."""
    h, _, d = q.shape
    kk = k.float().repeat_interleave(h // k.shape[0], dim=0)  # [H, N, d]
    allowed = key_pos[None, :] <= q_pos[:, None]  # [n_q, N]
    if merge_heads:
        logits = torch.einsum("hqd,hnd->qn", q.float(), kk) / math.sqrt(h * d)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    else:
        logits = torch.einsum("hqd,hnd->hqn", q.float(), kk) / math.sqrt(d)
        probs = torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), dim=-1).mean(0)
    return probs.sum(0)


@register_method("a3")
@dataclass(kw_only=True)
class A3(FusionMethod):
    """A³ (fusion): recompute the top-r cached rows by pooled question→context attention."""

    pool: int = 5
    merge_heads: bool = True

    paper: ClassVar[str] = "arXiv 2511.17560"

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.pool) < 1 or int(self.pool) % 2 == 0:
            raise ConfigError(f"a3: pool must be an odd integer >= 1, got {self.pool}")

    def choose(self, inp: SelectInput) -> torch.Tensor:
        prompt = inp.prompt
        start = min(prompt.suffix_start(), prompt.num_tokens - 1)
        qrows = torch.arange(start, prompt.num_tokens, device=inp.q.device)
        s = question_attention(
            inp.q[:, qrows], inp.k, prompt.positions[qrows], prompt.positions, self.merge_heads
        )
        p = int(self.pool)
        if p > 1:
            s = F.avg_pool1d(s[None, None], kernel_size=p, stride=1, padding=p // 2, count_include_pad=True)[
                0, 0
            ]
        return top_cached(s, inp.cached, inp.budget)
