"""Graph-KV: segments attend only to their source segments (a segment-graph block mask), with shared
position ranges.

Wang et al., "Graph-KV: Breaking Sequence via Injecting Structural Biases into Large Language Models",
NeurIPS 2025, arXiv 2506.07334 (code: Graph-COM/GraphKV). Chunks are encoded alone (the store's canonical
caches, round 0); *target* chunks are then re-encoded while attending only to their *source* chunks and,
causally, to themselves (one message-passing step inside the model); raw segments (the question) attend
to everything before them. With ``layout="shared"`` every source starts at position ``P`` (the length of
leading raw segments), every target at ``P + L_src`` and the question at ``P + L_src + L_tgt`` (``L_*`` the
longest source / target), which removes ordering bias and keeps the span at about ``2·L``.

Graphs over the chunks (``graph``):

* ``bipartite`` (the paper's RAG construction): the first ``sources`` chunks are sources — a stand-in for
  the retriever's top-m, which our prompts do not carry — the other chunks are targets reading all sources;
* ``full``: every chunk is a target reading every other chunk;
* ``causal``: every chunk reads all earlier segments (with ``layout="sequential"`` this is ordinary causal
  prefill, the oracle);
* ``none``: no edges, nothing re-encoded (parallel encoding of the cached chunks).

Sources keep their round-0 cache in every layer; targets and raw rows are computed in every layer (Q/K/V,
attention under the block mask, MLP), so the compute fraction is ``(target + raw rows) / N``; attention
runs block by block (each computed segment over the rows it reads, then itself causally), ``O(|E|·L²)``.

Deviations: one forward re-encodes all targets together, a target reads the *fresh* K/V of other targets
it is connected to (``full``, ``causal``) instead of their round-0 copies, and a chunk appears once in the
final cache (the paper's Full mode keeps a source copy and a target copy of each chunk); targets do not
read leading raw segments except under ``causal`` (the released code keeps the prefix out as well); the
paper's block-fine-tuned backbone is ours only for ``tiny`` (``examples/finetune_graphkv.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import AssembledPrompt, Chunk, Segment
from mpckv.plaintext.fusion.selector import FusionMethod
from mpckv.registry import register_method

GRAPHS = ("bipartite", "full", "causal", "none")
LAYOUTS = ("shared", "sequential")


@register_method("graphkv")
@dataclass(kw_only=True)
class GraphKV(FusionMethod):
    """Graph-KV (fusion): re-encode target chunks over their source chunks under a segment-graph mask."""

    sources: int = field(default=1, metadata={"min": 0})
    graph: str = "bipartite"
    layout: str = "shared"
    ratio: float = 1.0
    full_layers: int = 0

    paper: ClassVar[str] = "arXiv 2506.07334"
    static: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.graph not in GRAPHS:
            raise ConfigError(f"graphkv: graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"graphkv: layout must be one of {LAYOUTS}, got {self.layout!r}")

    # ------------------------------------------------------------------ roles and positions
    def roles(self, segments: list[Segment]) -> list[str]:
        """Per segment: ``"source"``, ``"target"`` or ``"raw"``."""
        chunk_idx = [i for i, s in enumerate(segments) if isinstance(s, Chunk)]
        out = ["raw"] * len(segments)
        for rank, i in enumerate(chunk_idx):
            if self.graph == "none":
                out[i] = "source"
            elif self.graph == "bipartite":
                out[i] = "source" if rank < int(self.sources) else "target"
            else:
                out[i] = "target"
        return out

    def starts(self, segments: list[Segment]) -> list[int] | None:
        """First position of every segment (``None`` = contiguous)."""
        if self.layout == "sequential":
            return None
        roles = self.roles(segments)
        chunk_idx = [i for i, r in enumerate(roles) if r != "raw"]
        if not chunk_idx:
            return None
        first, last = chunk_idx[0], chunk_idx[-1]
        if any(r == "raw" for r in roles[first:last]):
            raise ConfigError("graphkv with layout='shared' needs raw segments before or after all chunks")
        prefix = sum(len(s.token_ids) for s in segments[:first])
        l_src = max((len(segments[i].token_ids) for i in chunk_idx if roles[i] == "source"), default=0)
        l_tgt = max((len(segments[i].token_ids) for i in chunk_idx if roles[i] == "target"), default=0)
        out, nxt = [], prefix + l_src + l_tgt
        for i, seg in enumerate(segments):
            if i < first:
                out.append(sum(len(s.token_ids) for s in segments[:i]))
            elif roles[i] == "source":
                out.append(prefix)
            elif roles[i] == "target":
                out.append(prefix + l_src)
            else:
                out.append(nxt)
                nxt += len(seg.token_ids)
        return out

    def edges(self, roles: list[str]) -> list[list[bool]]:
        """Segment adjacency: ``edges[a][b]`` = segment ``a`` reads segment ``b`` (``a != b``)."""
        ns = len(roles)
        out = [[False] * ns for _ in range(ns)]
        for a in range(ns):
            for b in range(ns):
                if a == b:
                    continue
                if roles[a] == "raw" or self.graph == "causal":
                    out[a][b] = b < a
                elif roles[a] == "target" and roles[b] != "raw":
                    out[a][b] = self.graph == "full" or roles[b] == "source"
        return out

    def allowed(self, segment_ids: torch.Tensor, roles: list[str]) -> torch.Tensor:
        """``[N, N]`` bool: row ``i`` may attend key ``j`` (in-segment causality by row order)."""
        seg = segment_ids
        n, dev = int(seg.shape[0]), seg.device
        edges = torch.tensor(self.edges(roles), dtype=torch.bool, device=dev)
        idx = torch.arange(n, device=dev)
        same = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
        return same | edges[seg[:, None], seg[None, :]]

    def static_rows(self, prompt: AssembledPrompt) -> torch.Tensor:
        roles = prompt.extras.get("graphkv_roles", [])
        rows = [i for i, s in enumerate(prompt.segment_ids.tolist()) if roles and roles[s] == "target"]
        return torch.tensor(rows, dtype=torch.long, device=prompt.ids.device)

    # ------------------------------------------------------------------ the forward
    @torch.no_grad()
    def graph_forward(self, model: Any, prompt: AssembledPrompt) -> tuple[Any, ...]:
        """Per-layer ``K, V [1, Hk, N, d]``, last-row logits, recomputed cached rows, ``None`` queries and
        the rows computed over all layers (the driver's ``fused_forward`` contract)."""
        roles = prompt.extras["graphkv_roles"]
        cfg, dev = model.config, prompt.ids.device
        seg_ids = prompt.segment_ids.tolist()
        rows = torch.tensor([i for i, s in enumerate(seg_ids) if roles[s] != "source"], device=dev)
        if rows.numel() == 0 or int(rows[-1]) != prompt.num_tokens - 1:
            raise ConfigError("graphkv needs the prompt to end in a raw segment or a target chunk")
        # block structure: each computed segment attends to the rows of the segments it reads, then to
        # itself causally (O(|E|·L²) instead of a dense N × N mask)
        edges = self.edges(roles)
        spans = [(s, e) for s, e, _ in prompt.spans]
        local = {int(r): i for i, r in enumerate(rows.tolist())}
        blocks = []
        for a, (s, e) in enumerate(spans):
            if roles[a] == "source":
                continue
            reads = [i for b, (s2, e2) in enumerate(spans) if edges[a][b] for i in range(s2, e2)]
            keys = torch.tensor([*reads, *range(s, e)], dtype=torch.long, device=dev)
            n_own = e - s
            mask = torch.ones(n_own, keys.numel(), dtype=torch.bool, device=dev)
            mask[:, len(reads) :] = torch.ones(n_own, n_own, dtype=torch.bool, device=dev).tril()
            if cfg.sliding_window is not None:
                near = prompt.positions[s:e, None] - prompt.positions[keys][None, :] < cfg.sliding_window
                mask = mask & near
            blocks.append((local[s], local[s] + n_own, keys, mask[None, None]))
        q_pos = prompt.positions[rows]
        hidden = model.embed(prompt.ids[rows][None])
        ks, vs = [], []
        for layer in range(cfg.num_hidden_layers):
            q, k, v = model.qkv(layer, hidden, q_pos[None])
            k_l, v_l = prompt.k_old[layer][None].clone(), prompt.v_old[layer][None].clone()
            k_l[:, :, rows], v_l[:, :, rows] = k.to(k_l.dtype), v.to(v_l.dtype)
            gqa = q.shape[1] != k_l.shape[1]
            attn = torch.empty_like(q)
            for lo, hi, keys, mask in blocks:
                attn[:, :, lo:hi] = F.scaled_dot_product_attention(
                    q[:, :, lo:hi],
                    k_l[:, :, keys],
                    v_l[:, :, keys],
                    attn_mask=mask,
                    scale=model.scale,
                    enable_gqa=gqa,
                )
            hidden = model.finish_layer(layer, hidden, attn)
            ks.append(k_l)
            vs.append(v_l)
        logits = model.logits(hidden[:, -1:])[:, 0]
        chosen = self.static_rows(prompt)
        computed = int(rows.numel()) * cfg.num_hidden_layers
        return ks, vs, logits, chosen, [None] * cfg.num_hidden_layers, computed
