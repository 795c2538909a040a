"""Elastic-Cache's drift-triggered refresh, adapted to reused chunk caches of an autoregressive model.

Nguyen-Tri, Ranjan, Shen, "Attention Is All You Need for KV Cache in Diffusion LLMs", arXiv 2510.14973.
The paper keeps K/V across denoising steps and refreshes them only when attention has drifted: it tracks
the most-attended token ``T`` (which drifts least, a conservative probe), measures ``σ = cos(A_t[:, T],
A_{t−1}[:, T])`` — the attention column of the *same* token under the queries at two consecutive steps —
and refreshes when ``σ < γ``, from the first drifted layer upwards (deeper layers drift more).

What we adapted (there are no denoising steps in our engine; the rule is applied where it fits, to KV
fusion): the two "steps" are the reused cache and the fresh computation of the fused prompt at the check
layer (layer ``full_layers``, after one fully recomputed layer). Queries = the fresh rows (the question and
other raw segments). For every chunk ``c``:

* probe ``T_c`` = the row of ``c`` with the largest column sum of the queries' attention over the *reused*
  keys (the previous step's most-attended token);
* ``A_old`` = per-head softmax of the queries over the reused keys, ``A_new`` over the fresh keys (causal by
  position); ``σ_c = cos(A_new[:, :, T_c], A_old[:, :, T_c])`` over heads × queries;
* drift ``d_c = 1 − σ_c ∈ [0, 2]``; chunk ``c`` is refreshed when ``d_c ≥ threshold`` (``threshold = 1 −
  γ``; the paper's γ ≈ 0.9 is ``threshold = 0.1``). Refreshing a chunk recomputes every one of its rows in
  all later layers (the driver's partial recompute, so the refresh is depth-limited from the check layer
  up, never below it).

``threshold = 0`` refreshes every chunk (⇒ full prefill), ``threshold > 2`` none (⇒ pure reuse of the
concatenated caches when ``check_writeback=False``; the default writes the check layer's fresh K/V as
CacheBlend does). ``ratio`` caps the refreshed rows (the most drifted chunks first, whole chunks only);
the default 1.0 leaves the decision to the drift test alone.

Not transferable: the per-layer restart of the refresh at the first drifted layer ``ℓ*`` (a reused chunk has
no hidden states from which to resume at a deeper layer, so the test runs once, at the check layer),
the sliding window of masked tokens and the block caching of far MASK tokens (no masked tokens in AR
decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mpckv.plaintext.fusion.selector import FusionMethod, SelectInput
from mpckv.registry import register_method


def _head_probs(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head softmax ``[H, n_q, N]`` of ``q [H, n_q, d]`` over ``k [Hk, N, d]`` (GQA repeated)."""
    kk = k.float().repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = torch.einsum("hqd,hnd->hqn", q.float(), kk) * scale
    return torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), dim=-1)


def chunk_drift(inp: SelectInput) -> list[tuple[int, int, float]]:
    """``(start, end, drift)`` per chunk of the prompt (see the module docstring)."""
    prompt = inp.prompt
    fresh = (~prompt.cached).nonzero()[:, 0]
    if fresh.numel() == 0:
        fresh = torch.tensor([prompt.num_tokens - 1], device=inp.q.device)
    pos = prompt.positions
    allowed = pos[None, :] <= pos[fresh][:, None]
    q = inp.q[:, fresh]
    k_old = torch.where(prompt.cached[None, :, None], inp.k_old, inp.k)  # raw rows have no reused keys
    a_old = _head_probs(q, k_old, allowed, inp.scale)
    a_new = _head_probs(q, inp.k, allowed, inp.scale)
    col = a_old.sum(dim=(0, 1))
    out = []
    for start, end in prompt.chunk_spans():
        t = start + int(col[start:end].argmax())
        x, y = a_new[:, :, t].reshape(-1), a_old[:, :, t].reshape(-1)
        if float(x.norm()) == 0.0 or float(y.norm()) == 0.0:  # no query sees the probe
            sigma = 1.0 if torch.equal(x, y) else 0.0
        else:
            sigma = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
        out.append((start, end, 1.0 - sigma))
    return out


@register_method("elasticcache")
@dataclass(kw_only=True)
class ElasticCache(FusionMethod):
    """Elastic-Cache (fusion, adapted): refresh the reused chunks whose probe attention drifted."""

    threshold: float = field(default=0.1, metadata={"min": 0.0})
    ratio: float = 1.0

    paper: ClassVar[str] = "arXiv 2510.14973"

    def choose(self, inp: SelectInput) -> torch.Tensor:
        drifted = [(d, s, e) for s, e, d in chunk_drift(inp) if d >= float(self.threshold)]
        drifted.sort(key=lambda x: (-x[0], x[1]))
        rows: list[int] = []
        for _, s, e in drifted:
            if len(rows) + (e - s) > inp.budget:
                continue
            rows.extend(range(s, e))
        inp.prompt.extras["elasticcache_drift"] = [d for _, _, d in sorted(drifted, key=lambda x: x[1])]
        return torch.tensor(sorted(rows), dtype=torch.long, device=inp.q.device)
