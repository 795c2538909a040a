"""KVShare's decode stage of DHD: refresh a few reused rows per generated token.

Yang et al., "KVShare", arXiv 2503.16525, stage 2 of Dual-Stage High-Deviation recompute. Attention drifts
as tokens are generated, so at every decode step the new token's attention at the check layer re-scores
the reused (cached, not yet recomputed) rows as ``α_t[j] · δ_j`` — ``α_t`` the new token's attention to row
``j`` (per-head softmaxes averaged over heads), ``δ_j`` the L1 value deviation measured at prefill — and
the ``N`` best rows are recomputed in the *next* forward as extra query rows at their original positions,
their K/V overwriting the cache in every layer.

One step of :func:`refresh_step` is one forward over ``[refresh rows R, new token]``: per layer fresh
Q/K/V of those rows (RoPE at their own positions), the rows of ``R`` written over the cache, the new token
appended, then attention of every row over the whole cache with a per-row causal mask by position (the
same rule as the prefill driver, :func:`mpckv.plaintext.fusion.recompute._rows_attention`).

Deviations: the refresh rows attend to the cache after this step's writes (a refreshed row sees its own
fresh key); a row is refreshed at most once; only a fused session without a post-fusion eviction method is
supported (rows must sit at their prompt positions); greedy decoding only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.assemble import AssembledPrompt


@dataclass
class RefreshState:
    """Decode-refresh bookkeeping of one fused request.

    ``delta [N]``: the prefill value deviation of every prompt row (0 on rows that were not cached);
    ``done [N]``: rows whose K/V is already fresh (raw rows, rows recomputed at prefill, refreshed rows);
    ``pending``: rows the next step recomputes; ``history``: rows refreshed so far, in order.
    """

    prompt: AssembledPrompt
    delta: torch.Tensor
    done: torch.Tensor
    per_step: int
    check_layer: int
    pending: torch.Tensor
    history: list[int]


def start_refresh(fused: Any, per_step: int, check_layer: int) -> RefreshState:
    """Refresh state after :func:`~mpckv.plaintext.fusion.recompute.prefill_segments` (``fused``)."""
    prompt = fused.prompt
    if prompt is None:
        raise ConfigError("decode refresh needs a fused prefill (this request fell back to full prefill)")
    if fused.post is not None:
        raise ConfigError(
            "decode refresh needs the fused cache at prompt positions; drop the post-fusion eviction method"
        )
    n = prompt.num_tokens
    delta = prompt.extras.get("kvshare_delta")
    if not isinstance(delta, torch.Tensor) or delta.shape != (n,):
        delta = torch.zeros(n, device=prompt.ids.device)
    done = ~prompt.cached.clone()
    done[fused.selected] = True
    empty = torch.zeros(0, dtype=torch.long, device=prompt.ids.device)
    return RefreshState(prompt, delta.float(), done, int(per_step), int(check_layer), empty, [])


def pick_refresh(state: RefreshState, alpha: torch.Tensor) -> torch.Tensor:
    """The ``per_step`` best rows by ``alpha · delta`` among rows not yet fresh (ties to the lower index)."""
    from mpckv.plaintext.fusion.selector import top_cached

    n = state.prompt.num_tokens
    score = alpha[:n].float() * state.delta
    candidates = ~state.done & (state.delta > 0)
    k = min(state.per_step, int(candidates.sum()))
    return top_cached(score, candidates, k)


@torch.no_grad()
def refresh_step(
    engine: Any, session: Any, state: RefreshState, token: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Feed ``token`` and recompute ``rows`` (default: ``state.pending``); choose the next rows.

    Returns the next-token logits ``[1, V]`` (also stored on ``session.logits``).
    """
    from mpckv.plaintext.fusion.recompute import _rows_attention

    model = engine.model
    cfg, dev = model.config, model.device
    prompt = state.prompt
    n = prompt.num_tokens
    refresh = (state.pending if rows is None else rows.to(device=dev, dtype=torch.long)).unique(sorted=True)
    if refresh.numel() and (int(refresh.min()) < 0 or int(refresh.max()) >= n):
        raise ConfigError("refresh rows must be prompt rows")
    pos = int(session.positions[0])
    if pos >= cfg.max_position_embeddings:
        raise ConfigError(f"cannot decode at position {pos}: max_position_embeddings is exhausted")
    if int(session.cache[0].max_length) != pos:
        raise ConfigError("decode refresh needs an uncompressed fused cache (one row per position)")
    r = int(refresh.numel())
    ids = torch.cat([prompt.ids[refresh], torch.tensor([int(token)], device=dev)])
    q_pos = torch.cat([prompt.positions[refresh], torch.tensor([pos], device=dev)])
    hidden = model.embed(ids[None])
    alpha: torch.Tensor | None = None
    for layer in range(cfg.num_hidden_layers):
        lc = session.cache[layer]
        q, k, v = model.qkv(layer, hidden, q_pos[None])
        if r:
            lc.k[:, :, refresh] = k[:, :, :r].to(lc.k.dtype)
            lc.v[:, :, refresh] = v[:, :, :r].to(lc.v.dtype)
        lc.append(k[:, :, r:], v[:, :, r:], q_pos[None, r:])
        keys, values = lc.keys(), lc.values()
        key_pos = lc.positions()[0, 0]
        attn = _rows_attention(q, keys, values, q_pos, key_pos, model.scale, "causal", cfg.sliding_window)
        if layer == state.check_layer:
            g = cfg.num_attention_heads // cfg.num_key_value_heads
            kk = keys[0].float().repeat_interleave(g, dim=0)  # [H, T, d]
            logits = torch.einsum("hd,htd->ht", q[0, :, -1].float(), kk) * model.scale
            alpha = torch.softmax(logits, dim=-1).mean(0)
        hidden = model.finish_layer(layer, hidden, attn)
    state.done[refresh] = True
    state.history.extend(int(i) for i in refresh.tolist())
    state.pending = (
        torch.zeros(0, dtype=torch.long, device=dev) if alpha is None else pick_refresh(state, alpha)
    )
    session.positions = session.positions + 1
    session.step += 1
    if session.dense_lengths is not None:
        session.dense_lengths = session.dense_lengths + 1
    session.peak_cache_bytes = max(session.peak_cache_bytes, session.cache.nbytes())
    session.logits = model.logits(hidden[:, -1:])[:, 0]
    return session.logits


def generate_with_refresh(
    engine: Any,
    fused: Any,
    max_new_tokens: int,
    per_step: int,
    check_layer: int,
    stop_tokens: Sequence[int] | None = None,
) -> list[int]:
    """Greedy generation from a fused prefill with ``per_step`` refresh rows per decode step."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    session = fused.session
    stops = set(engine.model.config.stop_token_ids if stop_tokens is None else stop_tokens)
    state = start_refresh(fused, per_step, check_layer)
    fused.refresh = state
    out: list[int] = []
    for i in range(max_new_tokens):
        tok = int(session.logits[0].argmax())
        if tok in stops:
            break
        out.append(tok)
        if i == max_new_tokens - 1:
            break
        refresh_step(engine, session, state, tok)
    return out
