"""The selective-recompute driver behind ``Engine.prefill_segments`` (one skeleton for every selector).

Following CacheBlend (Yao et al., EuroSys 2025, §4) and the shared structure of A³ and KVShare:

1. layers ``< full_layers``: every row is recomputed (ordinary causal prefill);
2. check layer ``full_layers`` (dynamic selectors): fresh Q/K/V of every row; the selector picks cached
   rows ``C``; ``S = C ∪ raw rows ∪ {last row}``; the queries of ``S`` attend to the fresh K/V of all rows
   (written to the cache unless ``check_writeback=False``); hidden states are cut to ``S``;
3. later layers: Q/K/V only for ``S`` (RoPE at their original positions), written over the re-rotated
   cached K/V; queries of ``S`` attend to all ``N`` keys with a per-row causal mask by original position
   (``key_pos <= q_pos``); o_proj and MLP on ``S`` only. Rows outside ``S`` keep the cached K/V.

Static selectors (EPIC) know ``S`` before the forward and skip the check layer. After fusion the engine's
non-fusion method (e.g. SnapKV in ``cacheblend+snapkv``, or the engine's own method when ``fusion=`` is
given explicitly) runs its ``on_prefill`` on the fused cache, layer by layer, with ``ctx.q`` holding the
fresh queries of recomputed rows and zeros elsewhere: window-based evictions (SnapKV, PyramidKV) are exact
when their observation window lies inside the recomputed question block.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import AssembledPrompt, as_segments, assemble
from mpckv.plaintext.fusion.rerotate import check_rotatable, ensure_fusion_ok
from mpckv.plaintext.fusion.selector import Concat, FusionMethod, SelectInput
from mpckv.plaintext.fusion.store import ChunkKVStore, model_fingerprint
from mpckv.plaintext.methods.base import KVMethod, PrefillContext


@dataclass
class FusionStats:
    """What one fused prefill did."""

    method: str
    num_tokens: int
    num_cached: int
    recomputed_cached: int  # cached rows recomputed after the check layer
    recompute_ratio: float  # recomputed_cached / num_cached
    compute_fraction: float  # rows computed over all layers / (N · L)
    chunk_hits: int
    chunk_misses: int
    ttft_s: float
    fused: bool = True
    fallback: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.chunk_hits + self.chunk_misses
        return self.chunk_hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "hit_rate": round(self.hit_rate, 4)}


@dataclass
class FusedPrefill:
    """Result of :func:`prefill_segments`: a ready :class:`~mpckv.plaintext.engine.Session` (decode with
    ``engine.decode`` / ``engine.continue_generation``), the statistics and the assembled prompt."""

    session: Any
    stats: FusionStats
    prompt: AssembledPrompt | None
    selected: torch.Tensor  # rows recomputed after the check layer (sorted)
    method: FusionMethod | None = None  # the fusion method that ran (None for full prefill)
    post: KVMethod | None = None  # the method run on the fused cache afterwards
    refresh: Any = None  # KVShare's decode-refresh state once generation ran (fusion.refresh.RefreshState)

    def generate(
        self, engine: Any, max_new_tokens: int, *, stop_tokens: Sequence[int] | None = None
    ) -> list[int]:
        """Greedy continuation of this request: the method's own decode (KVShare's refresh rows) when it
        has one, else :meth:`~mpckv.plaintext.engine.Engine.continue_generation`."""
        decode = getattr(self.method, "fused_generate", None)
        if decode is not None:
            tokens: list[int] = decode(engine, self, max_new_tokens, stop_tokens)
            return tokens
        res = engine.continue_generation(self.session, max_new_tokens, stop_tokens=stop_tokens)
        return list(res.tokens[0])


def default_store(model: Any) -> ChunkKVStore:
    """A memory-only store attached to ``model`` (created on first use)."""
    store = getattr(model, "_mpckv_chunk_store", None)
    if not isinstance(store, ChunkKVStore):
        store = ChunkKVStore(model_fingerprint(model), device=model.device)
        model._mpckv_chunk_store = store
    return store


def resolve(engine: Any, fusion: Any, params: dict[str, Any]) -> tuple[FusionMethod | None, KVMethod | None]:
    """``(fusion selector or None for full prefill, method to run on the fused cache or None)``."""
    from mpckv.plaintext.methods.compose import Composed
    from mpckv.registry import get_method

    own = engine.method
    parts = own.parts if isinstance(own, Composed) else [own]
    own_fusion = [p for p in parts if isinstance(p, FusionMethod)]
    rest = [p for p in parts if not isinstance(p, FusionMethod) and p.name != "dense"]
    post: KVMethod | None = rest[0] if len(rest) == 1 else (Composed(rest) if rest else None)
    if fusion is None:
        if len(own_fusion) != 1:
            raise ConfigError(
                "prefill_segments needs a fusion method: pass fusion='cacheblend' (or epic, a3, kvshare, "
                "concat, full) or build the engine with one, e.g. Engine(model, 'cacheblend+snapkv')"
            )
        if params:
            raise ConfigError("fusion parameters can only be given together with fusion=<name>")
        return own_fusion[0], post
    if isinstance(fusion, str):
        if fusion == "full":
            return None, post
        chosen = Concat(**params) if fusion == "concat" else get_method(fusion, **params)
    else:
        chosen = fusion
    if not isinstance(chosen, FusionMethod):
        raise ConfigError(f"{getattr(chosen, 'name', chosen)!r} is not a fusion method (family 'fusion')")
    chosen.check(engine.model.config)
    return chosen, post


def _rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    scale: float,
    mask: str,
    sliding_window: int | None,
) -> torch.Tensor:
    """Queries ``q [1, H, S, d]`` at positions ``q_pos [S]`` over keys ``k, v [1, Hk, N, d]``."""
    s, n = q.shape[2], k.shape[2]
    if mask == "causal":
        allowed = key_pos[None, :] <= q_pos[:, None]
    else:  # bottom-right aligned: the i-th selected row sees keys 0 .. N - S + i
        limit = n - s + torch.arange(s, device=q.device)
        allowed = torch.arange(n, device=q.device)[None, :] <= limit[:, None]
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, None] - key_pos[None, :] < sliding_window)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=scale, enable_gqa=gqa)


def _check_chosen(chosen: torch.Tensor, prompt: AssembledPrompt, budget: int, name: str) -> torch.Tensor:
    chosen = chosen.to(device=prompt.ids.device, dtype=torch.long).unique(sorted=True)
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= prompt.num_tokens):
        raise ConfigError(f"{name} selected rows outside the prompt")
    if chosen.numel() and not bool(prompt.cached[chosen].all()):
        raise ConfigError(f"{name} selected rows that are not cached")
    if budget >= 0 and chosen.numel() > budget:
        raise ConfigError(f"{name} selected {chosen.numel()} rows, more than its budget {budget}")
    return chosen


@torch.no_grad()
def fused_forward(
    model: Any, prompt: AssembledPrompt, method: FusionMethod, keep_q: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, list[Any], int]:
    """Run the skeleton. Returns per-layer ``K, V [1, Hk, N, d]``, the last row's logits ``[1, V]``, the
    chosen cached rows, per-layer queries of computed rows (``[1, H, N, d]`` with zeros elsewhere, only when
    ``keep_q``) and the number of rows computed over all layers."""
    cfg, xp, dev = model.config, model.xp, model.device
    n, nl = prompt.num_tokens, cfg.num_hidden_layers
    pos = prompt.positions
    forced = ~prompt.cached
    forced[n - 1] = True
    budget = method.budget_for(prompt.num_cached)
    rows: torch.Tensor | None = None  # None = every row is current
    chosen = torch.zeros(0, dtype=torch.long, device=dev)
    if method.static:
        chosen = _check_chosen(method.static_rows(prompt), prompt, -1, method.name)
    hidden = model.embed(prompt.ids[None])
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    qs: list[Any] = []
    computed = 0
    lengths = torch.tensor([n], device=dev)
    for layer in range(nl):
        k_old, v_old = prompt.k_old[layer][None], prompt.v_old[layer][None]
        if layer < method.full_layers:
            q, k, v = model.qkv(layer, hidden, pos[None])
            attn = xp.prefill_attention(q, k, v, lengths, model.scale, cfg.sliding_window)
            hidden = model.finish_layer(layer, hidden, attn)
            ks.append(k)
            vs.append(v)
            qs.append(q if keep_q else None)
            computed += n
            continue
        if rows is None and not method.static:  # the check layer
            q, k, v = model.qkv(layer, hidden, pos[None])
            inp = SelectInput(layer, q[0], k[0], v[0], k_old[0], v_old[0], prompt, budget, model.scale, cfg)
            chosen = _check_chosen(method.choose(inp), prompt, budget, method.name)
            mask = forced.clone()
            mask[chosen] = True
            rows = mask.nonzero()[:, 0]
            if method.check_writeback:
                k_l, v_l = k, v
            else:
                k_l, v_l = k_old.clone(), v_old.clone()
                k_l[:, :, rows], v_l[:, :, rows] = k[:, :, rows], v[:, :, rows]
            q = q[:, :, rows]
            hidden = hidden[:, rows]
            computed += n
        else:
            if rows is None:  # static selector: cut to S before the first partial layer
                mask = forced.clone()
                mask[chosen] = True
                rows = mask.nonzero()[:, 0]
                hidden = hidden[:, rows]
            q, k, v = model.qkv(layer, hidden, pos[rows][None])
            k_l, v_l = k_old.clone(), v_old.clone()
            k_l[:, :, rows], v_l[:, :, rows] = k.to(k_l.dtype), v.to(v_l.dtype)
            computed += int(rows.numel())
        attn = _rows_attention(q, k_l, v_l, pos[rows], pos, model.scale, method.mask, cfg.sliding_window)
        hidden = model.finish_layer(layer, hidden, attn)
        ks.append(k_l)
        vs.append(v_l)
        if keep_q:
            full_q = torch.zeros(1, cfg.num_attention_heads, n, cfg.head_dim, dtype=q.dtype, device=dev)
            full_q[:, :, rows] = q
            qs.append(full_q)
        else:
            qs.append(None)
    logits = model.logits(hidden[:, -1:])[:, 0]
    if rows is None:  # every layer was full
        chosen = prompt.cached.nonzero()[:, 0]
    return ks, vs, logits, chosen, qs, computed


def _session(
    model: Any,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    logits: torch.Tensor,
    token_pos: torch.Tensor | None = None,
) -> Any:
    from mpckv.plaintext.engine import Session

    cfg, xp, dev = model.config, model.xp, model.device
    n = ks[0].shape[2]
    cache = xp.new_cache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, model.dtype, dev)
    positions = (torch.arange(n, device=dev) if token_pos is None else token_pos.to(dev))[None]
    for layer, (k, v) in enumerate(zip(ks, vs, strict=True)):
        cache[layer].append(k, v, positions)
    lengths = torch.tensor([n], device=dev)
    return Session(
        cache=cache,
        positions=positions.max(dim=1).values + 1,
        prompt_lengths=lengths,
        states=[{} for _ in range(cfg.num_hidden_layers)],
        logits=logits,
        read_sums=[0.0] * cfg.num_hidden_layers,
        peak_cache_bytes=cache.nbytes(),
        dense_lengths=lengths.clone(),
    )


def _run_post(model: Any, session: Any, post: KVMethod, qs: list[Any]) -> None:
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        ctx = PrefillContext(
            layer,
            cfg,
            session.cache[layer],
            qs[layer],
            session.prompt_lengths,
            model.scale,
            session.states[layer],
            model.inv_freq,
            session.states,
            model.xp,
            session.cache,
        )
        post.on_prefill(ctx)
    session.peak_cache_bytes = max(session.peak_cache_bytes, session.cache.nbytes())


def prefill_segments(
    engine: Any,
    segments: Sequence[Any],
    fusion: Any = None,
    *,
    store: ChunkKVStore | None = None,
    strict_check: bool = False,
    **params: Any,
) -> FusedPrefill:
    """Prefill a request made of cached chunks and raw segments (see the module docstring).

    ``fusion``: a fusion method name (``cacheblend``, ``epic``, ``a3``, ``kvshare``), ``"concat"`` (plain
    concatenation), ``"full"`` (full prefill of the assembled ids), a :class:`FusionMethod` object, or
    ``None`` to use the engine's own fusion method. ``params`` go to the method (e.g. ``ratio=0.15``).
    ``store`` defaults to a memory-only store attached to the model.
    """
    model = engine.model
    if model.xp.secure:
        raise ConfigError("prefill_segments runs in plaintext only (no secure fusion path yet)")
    segs = as_segments(segments)
    method, post = resolve(engine, fusion, params)
    t0 = time.perf_counter()
    fallback = None
    if method is not None:
        check_rotatable(model.config.rope)
        if not ensure_fusion_ok(model, strict=strict_check).ok:
            fallback = "rotation self-check failed"
    if method is None or fallback is not None:
        ids = [t for s in segs for t in s.token_ids]
        session = engine.prefill([ids])
        n = len(ids)
        _sync(model.device)
        stats = FusionStats(
            "full", n, 0, 0, 1.0, 1.0, 0, 0, time.perf_counter() - t0, fused=False, fallback=fallback
        )
        return FusedPrefill(session, stats, None, torch.arange(0, device=model.device))
    store = store if store is not None else default_store(model)
    graph = getattr(method, "graph_forward", None)  # Graph-KV: its own positions and block-mask forward
    if graph is not None:
        prompt = assemble(model, segs, store, starts=method.starts(segs))
        prompt.extras["graphkv_roles"] = method.roles(segs)
        t1 = time.perf_counter()
        ks, vs, logits, chosen, qs, computed = graph(model, prompt)
        if post is not None:
            raise ConfigError("graphkv cannot be combined with a post-fusion method yet")
    else:
        prompt = assemble(model, segs, store)
        t1 = time.perf_counter()
        ks, vs, logits, chosen, qs, computed = fused_forward(model, prompt, method, keep_q=post is not None)
    session = _session(model, ks, vs, logits, prompt.positions)
    if post is not None:
        _run_post(model, session, post, qs)
    _sync(model.device)
    t2 = time.perf_counter()
    n, nc = prompt.num_tokens, prompt.num_cached
    stats = FusionStats(
        method=method.name,
        num_tokens=n,
        num_cached=nc,
        recomputed_cached=int(chosen.numel()),
        recompute_ratio=round(chosen.numel() / nc, 5) if nc else 1.0,
        compute_fraction=round(computed / (n * model.config.num_hidden_layers), 5),
        chunk_hits=prompt.hits,
        chunk_misses=prompt.misses,
        ttft_s=t2 - t0,
        timings={**prompt.timings, "assemble_s": t1 - t0, "forward_s": t2 - t1},
    )
    return FusedPrefill(session, stats, prompt, chosen, method, post)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
