"""Prompt assembly for KV fusion: cached chunks and raw segments → ids, positions, segment ids, old K/V.

A request is a list of segments: :class:`Chunk` (a span whose KV may be reused from the store) and
:class:`Raw` (tokens that are always computed fresh, e.g. the question). Token ids are concatenated per
segment as given; the joined text is never re-tokenized (boundary merges would change the ids and break
cache hits). Positions are absolute and contiguous (``0..N-1``); each chunk's canonical cache is rotated
once to its offset (:func:`~mpckv.plaintext.fusion.rerotate.rotate_chunk`). Chunk caches are computed behind
the model's BOS token (:func:`sink_prefix`), which is then dropped: the only attention sink of the assembled
prompt is its own first token, as in full prefill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.fusion.rerotate import rotate_chunk
from mpckv.plaintext.fusion.store import ChunkKV, ChunkKVStore


@dataclass(frozen=True)
class Chunk:
    """A reusable span (looked up in / written to the chunk store)."""

    token_ids: tuple[int, ...]

    def __init__(self, token_ids: Sequence[int]) -> None:
        object.__setattr__(self, "token_ids", tuple(int(t) for t in token_ids))


@dataclass(frozen=True)
class Raw:
    """Tokens computed fresh in every request (question, instruction, cache misses by choice)."""

    token_ids: tuple[int, ...]

    def __init__(self, token_ids: Sequence[int]) -> None:
        object.__setattr__(self, "token_ids", tuple(int(t) for t in token_ids))


Segment = Chunk | Raw


@dataclass
class AssembledPrompt:
    """The assembled request.

    ``ids, positions, segment_ids [N]`` (long), ``cached [N]`` (bool: the row's KV comes from a chunk
    cache), ``spans`` (``(start, end, kind)`` per segment, kind ``"chunk"`` | ``"raw"``), and for cached
    rows the re-rotated ``k_old, v_old [L, Hk, N, d]`` (zeros on raw rows).
    """

    ids: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor
    cached: torch.Tensor
    spans: list[tuple[int, int, str]]
    k_old: torch.Tensor
    v_old: torch.Tensor
    hits: int = 0
    misses: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # what a selector leaves for decode (KVShare δ)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_cached(self) -> int:
        return int(self.cached.sum())

    def chunk_spans(self) -> list[tuple[int, int]]:
        return [(s, e) for s, e, kind in self.spans if kind == "chunk"]

    def suffix_start(self) -> int:
        """Start of the trailing raw segments (the question block); ``N`` when the prompt ends in a chunk."""
        start = self.num_tokens
        for s, _e, kind in reversed(self.spans):
            if kind != "raw":
                break
            start = s
        return start


def as_segments(segments: Sequence[Any]) -> list[Segment]:
    """Accept :class:`Chunk` / :class:`Raw` objects, or ``("chunk" | "raw", ids)`` pairs."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Chunk | Raw):
            out.append(seg)
        elif isinstance(seg, tuple) and len(seg) == 2 and seg[0] in ("chunk", "raw"):
            out.append(Chunk(seg[1]) if seg[0] == "chunk" else Raw(seg[1]))
        else:
            raise ConfigError(f"a segment must be Chunk(ids), Raw(ids) or ('chunk'|'raw', ids), got {seg!r}")
    if not out or any(len(s.token_ids) == 0 for s in out):
        raise ConfigError("prefill_segments needs at least one segment and no empty segment")
    return out


def sink_prefix(model: Any) -> tuple[int, ...]:
    """Tokens a chunk is prefilled behind: the model's BOS token when it has one, else none.

    A chunk prefilled alone turns its own first token into an attention sink (massive activations that
    draw most of every head's attention); concatenated, a request then carries one spurious sink per chunk,
    and every chunk's deeper K/V were computed relative to it. Prefilling behind the BOS that the assembled
    prompt also starts with keeps the sink where full prefill has it. CacheBlend's official pipeline does
    the same (each chunk prefilled behind BOS, the BOS entry dropped; arXiv 2405.16444), as does EPIC's
    LegoLink-0 with dummy sink tokens (arXiv 2410.15332). Models without a BOS token get no prefix.
    """
    bos = model.config.bos_token_id
    return () if bos is None else (int(bos),)


@torch.no_grad()
def compute_chunk(
    model: Any, token_ids: Sequence[int], prefix: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``k, v [L, Hk, n, d]`` of ``token_ids``: keys as if at positions ``0..n-1``.

    The chunk is prefilled behind ``prefix`` (default :func:`sink_prefix`); the prefix rows are dropped and
    the keys rotated back by ``len(prefix)`` (in fp32) so the canonical form stays at ``0..n-1``.
    """
    from mpckv.plaintext.engine import Engine

    pre = sink_prefix(model) if prefix is None else tuple(int(t) for t in prefix)
    p = len(pre)
    session = Engine(model, "dense").prefill([[*pre, *(int(t) for t in token_ids)]])
    ks = torch.stack([lc.keys()[0][:, p:] for lc in session.cache.layers])
    vs = torch.stack([lc.values()[0][:, p:] for lc in session.cache.layers]).contiguous()
    return rotate_chunk(ks, -p, model.inv_freq).contiguous(), vs


def assemble(
    model: Any, segments: Sequence[Segment], store: ChunkKVStore, starts: Sequence[int] | None = None
) -> AssembledPrompt:
    """Look every chunk up (computing and storing misses), rotate it to its offset, build the tensors.

    ``starts``: the first position of every segment (default: contiguous, ``0..N-1``); Graph-KV's shared
    position ranges give several segments the same start.
    """
    if starts is not None and (len(starts) != len(segments) or any(int(s) < 0 for s in starts)):
        raise ConfigError("assemble: starts needs one non-negative position per segment")
    cfg, dev = model.config, model.device
    t0 = time.perf_counter()
    ids: list[int] = []
    seg_ids: list[int] = []
    cached: list[bool] = []
    spans: list[tuple[int, int, str]] = []
    placed: list[tuple[int, int, ChunkKV]] = []  # (row, position) of each chunk's first token
    pos: list[int] = []
    hits = misses = 0
    compute_s = 0.0
    for i, seg in enumerate(segments):
        start = len(ids)
        p0 = start if starts is None else int(starts[i])
        pos.extend(range(p0, p0 + len(seg.token_ids)))
        ids.extend(seg.token_ids)
        seg_ids.extend([i] * len(seg.token_ids))
        if isinstance(seg, Chunk):
            tc = time.perf_counter()
            chunk, hit = store.get_or_compute(seg.token_ids, lambda t: compute_chunk(model, t))
            if hit:
                hits += 1
            else:
                misses += 1
                compute_s += time.perf_counter() - tc
            placed.append((start, p0, chunk))
            cached.extend([True] * len(seg.token_ids))
            spans.append((start, len(ids), "chunk"))
        else:
            cached.extend([False] * len(seg.token_ids))
            spans.append((start, len(ids), "raw"))
    n = len(ids)
    if max(pos) + 1 > cfg.max_position_embeddings:
        raise ConfigError(
            f"assembled prompt reaches position {max(pos)} >= max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    t1 = time.perf_counter()
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, n, cfg.head_dim)
    k_old = torch.zeros(shape, dtype=model.dtype, device=dev)
    v_old = torch.zeros(shape, dtype=model.dtype, device=dev)
    with store.use([c.key for _, _, c in placed]):
        for start, p0, chunk in placed:
            end = start + chunk.num_tokens
            k_old[:, :, start:end] = rotate_chunk(chunk.k.to(dev), p0, model.inv_freq).to(model.dtype)
            v_old[:, :, start:end] = chunk.v.to(device=dev, dtype=model.dtype)
    t2 = time.perf_counter()
    return AssembledPrompt(
        ids=torch.tensor(ids, dtype=torch.long, device=dev),
        positions=torch.tensor(pos, dtype=torch.long, device=dev),
        segment_ids=torch.tensor(seg_ids, dtype=torch.long, device=dev),
        cached=torch.tensor(cached, dtype=torch.bool, device=dev),
        spans=spans,
        k_old=k_old,
        v_old=v_old,
        hits=hits,
        misses=misses,
        timings={"lookup_s": t1 - t0 - compute_s, "miss_compute_s": compute_s, "rotate_s": t2 - t1},
    )
