"""Keyformer — key tokens ranked by a Gumbel-regularised, temperature-annealed accumulated score.

Adnan, Arunkumar, Jain, Nair, Soloveychik, Kamath. *Keyformer: KV Cache Reduction through Key Tokens
Selection for Efficient Generative Inference.* MLSys 2024, arXiv 2403.09054 (official code
d-matrix-ai/keyformer-llm).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.methods.allocators import budget_entry_tokens
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext
from mpckv.plaintext.methods.column_scores import ROW_BLOCK, all_query_votes, causal_column_sums
from mpckv.plaintext.methods.scorers import keep_topk, reduce_group
from mpckv.registry import register_method

SCORE = "keyformer_score"
_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (values stay below 2^32, products below 2^63)."""
    x = x & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def gumbel_noise(
    seed: int, layer: int, heads: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """Counter-based Gumbel(0, 1) noise, a pure function of (seed, layer, head, query pos, key pos).

    Used at decode (one query row per step, cheap); the prefill uses :func:`block_gumbel`.

    The arguments broadcast against each other (int64 tensors); the result is fp32. Keying the draws by
    positions rather than by a stream makes them independent of batch composition and of compaction.
    """
    h = _mix(torch.full((), seed * 0x9E37 + layer * 0x85EB + 0x1234567, dtype=torch.long))
    h = _mix(h ^ (heads.long() * 0x27D4EB2F & _M32))
    h = _mix(h ^ q_pos.long())
    h = _mix(h ^ (k_pos.long() * 0x165667B1 & _M32))
    u = (h.double() + 0.5) / 4294967296.0
    return (-torch.log(-torch.log(u))).float()


def _block_seed(seed: int, layer: int, block: int) -> int:
    """A generator seed for one (run seed, layer, query block); distinct triples give unrelated seeds."""
    digest = hashlib.blake2b(f"keyformer/{seed}/{layer}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


def block_gumbel(seed: int, layer: int, heads: int, r0: int, rows: int, keys: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[heads, rows, keys]`` (fp32, CPU) of the prompt queries ``r0 … r0+rows-1``.

    One ``torch.Generator`` per (``seed``, ``layer``, query block ``r0 // ROW_BLOCK``) draws the block's
    causal rectangle ``[heads, ROW_BLOCK, r0 + ROW_BLOCK]`` as ``−log(−log U)``, ``U`` uniform (two logs
    per entry, no hashing); the requested rows/keys are cut from it and keys past the rectangle (in every
    row's future, masked anyway) are 0. The draws therefore depend only on (seed, layer, head, query
    position, key position): not on the prompt length, the batch or the chunking.
    """
    if r0 % ROW_BLOCK:
        raise ValueError(f"block_gumbel: r0 must be a multiple of {ROW_BLOCK}, got {r0}")
    gen = torch.Generator().manual_seed(_block_seed(seed, layer, r0 // ROW_BLOCK))
    width = r0 + ROW_BLOCK
    # U ∈ (0, 1) (fp32 uniforms moved to the midpoints of their 2^-24 grid), ζ = −log(−log U)
    z = torch.rand(heads, ROW_BLOCK, width, generator=gen).add_(2.0**-25).log_().neg_().log_().neg_()
    z = z[:, :rows, : min(keys, width)]
    if keys > width:
        z = torch.cat([z, z.new_zeros(heads, rows, keys - width)], dim=-1)
    return z


def noisy_column_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    tau: float,
    noise_scale: float,
    seed: int,
    layer: int,
) -> torch.Tensor:
    """Column sums ``[B, H, L]`` of ``softmax((x + noise_scale·ζ)/τ)`` over all causal prompt queries.

    ``q [B, H, T, d]`` are the prompt queries (query ``i`` sits at position ``i``), ``keys [B, Hk, L, d]``
    the uncompacted prompt keys, ``lengths [B]`` the prompt lengths; ``x = q·kᵀ·scale`` and ``ζ`` comes
    from :func:`block_gumbel`. Computed by :func:`causal_column_sums` (blocked, future keys skipped).
    """
    h = q.shape[1]

    def noise(r0: int, rows: int, n_keys: int) -> torch.Tensor:
        return block_gumbel(seed, layer, h, r0, rows, n_keys)

    return causal_column_sums(
        q, keys, lengths, scale, tau, noise if noise_scale else None, noise_scale if noise_scale else 1.0
    )


@register_method("keyformer")
@dataclass(kw_only=True)
class Keyformer(KVMethod):
    """H2O's skeleton (recent window + key tokens, one eviction per decode step) with Keyformer's score.

    Per (sample, KV head) with prompt length ``N`` the cache holds ``k`` entries (the budget, default 60 %
    of ``N``): the last ``w = ⌊recent_fraction·k⌋`` plus the ``k − w`` others with the largest accumulated
    score ``S``. The score adds, for every query, ``f = softmax((x + ζ)/τ)`` over the entries it sees, with
    logits ``x = q·kᵀ/√d``, Gumbel noise ``ζ`` and temperature ``τ``; attention itself is unchanged. At
    prefill ``S`` sums ``f`` over all prompt queries (τ = ``tau_init``); at decode step ``s`` (0-based)
    ``τ = tau_init + min(s + 1, max_new_tokens)·(tau_end − tau_init)/max_new_tokens``, so the
    ``max_new_tokens``-th generated token uses ``tau_end``. ``S`` is summed over the GQA group.

    Parameters
    ----------
    recent_fraction:
        Share of the kept entries that is the recent window (paper script: 30 %).
    tau_init, tau_end, max_new_tokens:
        Linear temperature schedule (paper: 1 → 2 over the generation length).
    noise_scale:
        Multiplier of the Gumbel noise (1 = the paper; 0 = no noise).
    seed:
        Seed of the noise; runs with the same seed repeat exactly.
    budget:
        Kept entries ``k`` per (sample, KV head): a ratio of the prompt length (paper ``kv_cache`` %) or a
        token count. Default 0.6.

    Notes
    -----
    Deviations: (1) the noise is keyed by positions instead of one stateful ``torch`` stream, so a batch
    gives the same draws as its samples run alone and draws do not depend on compaction (samples of a
    batch share draws at equal positions). Prefill: one ``torch.Generator`` per (seed, layer, block of
    ``ROW_BLOCK`` query positions) draws i.i.d. Gumbel noise for the block's causal query × key rectangle
    only (:func:`block_gumbel`); decode: a counter-based hash of (seed, layer, head, query position, key
    position) (:func:`gumbel_noise`, one row per step). The noise stays per (query, key) entry, as in the
    paper and the card — not on the accumulated per-key score, which would change the method — so the
    generators are different but the distribution is the same. Prefill cost: ≈ ``H·T²/2`` draws and
    exps per layer (half of the dense ``T²``; at 4K with 14/2 heads ≈ 3.4× faster than hashing every
    pair, ≈ 2.5× the cost of H2O's prefill scores).
    (2) Scores and eviction are per sample and per KV head (official: summed over the batch, MHA only).
    (3) The cache is compacted instead of masked. (4) With ``noise_scale = 0`` and ``τ ≡ 1`` the score is
    the plain attention and the method takes H2O's code path (equal to ``h2o`` with
    ``recent_fraction`` and the same budget). (5) Ties go to the lower index.
    """

    recent_fraction: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    max_new_tokens: int = 128
    noise_scale: float = 1.0
    seed: int = 0

    family = "eviction"
    paper = "Adnan et al., MLSys 2024 (arXiv 2403.09054)"
    secure = "planned"
    secure_note: ClassVar[str] = (
        "H2O's secure arg-min per step plus a second softmax; the noise is public (seeded), not built yet"
    )
    needs_decode_probs = True
    default_budget = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ConfigError(f"keyformer: recent_fraction must be in [0, 1], got {self.recent_fraction}")
        if self.tau_init <= 0 or self.tau_end <= 0:
            raise ConfigError(f"keyformer: temperatures must be > 0, got {self.tau_init}, {self.tau_end}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"keyformer: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.noise_scale) or self.noise_scale < 0:
            raise ConfigError(f"keyformer: noise_scale must be a finite number >= 0, got {self.noise_scale}")

    def tau(self, step: int | None) -> float:
        """Temperature at decode step ``step`` (``None`` = the prompt)."""
        if step is None:
            return self.tau_init
        t = min(step + 1, self.max_new_tokens)
        return self.tau_init + t * (self.tau_end - self.tau_init) / self.max_new_tokens

    def _plain(self, tau: float) -> bool:
        return self.noise_scale == 0 and tau == 1.0

    def _split(self, n: int, layer: int, head: int) -> tuple[int, int]:
        k = max(1, budget_entry_tokens(self.resolved_budget, n, layer, head))
        return k, min(k, math.floor(self.recent_fraction * k + 1e-9))

    def _evict(self, ctx: PrefillContext | DecodeContext) -> None:
        cache = ctx.cache
        k, recent = ctx.state["k"], ctx.state["recent"]
        if bool((cache.lengths <= k).all()):
            return
        col = torch.arange(cache.max_length, device=k.device)
        forced = col >= (cache.lengths - recent)[..., None]
        keep_topk(cache, cache.meta[SCORE][:, :, : cache.max_length], k, forced)

    def on_prefill(self, ctx: PrefillContext) -> None:
        cache = ctx.cache
        splits = [
            [self._split(int(n), ctx.layer, h) for h in range(cache.kv_heads)]
            for n in ctx.prompt_lengths.tolist()
        ]
        both = torch.tensor(splits, dtype=torch.long, device=cache.lengths.device)
        ctx.state["k"], ctx.state["recent"] = both[..., 0].contiguous(), both[..., 1].contiguous()
        tau = self.tau(None)
        if self._plain(tau):
            scores = all_query_votes(ctx, "sum")
        else:
            if cache.version != 0:
                raise ConfigError(
                    "keyformer needs the uncompacted prompt cache; put it first in a composition"
                )
            per_head = ctx.memoized(
                ("keyformer", tau, self.noise_scale, self.seed),
                lambda: noisy_column_scores(
                    ctx.q,
                    cache.keys(),
                    ctx.prompt_lengths.to(ctx.q.device),
                    ctx.scale,
                    tau,
                    self.noise_scale,
                    self.seed,
                    ctx.layer,
                ),
            )
            scores = reduce_group(per_head, cache.kv_heads, "sum")
        cache.add_meta(SCORE)[:, :, : scores.shape[-1]] = scores
        self._evict(ctx)

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        cache = ctx.cache
        tau = self.tau(ctx.step)
        if self._plain(tau):
            if probs is None:
                raise ConfigError("keyformer needs the decode attention probabilities (needs_decode_probs)")
            f = probs.float()
        else:
            f = self._decode_scores(ctx, tau)
        n = f.shape[-1]
        cache.meta[SCORE][:, :, :n] += reduce_group(f, cache.kv_heads, "sum")
        self._evict(ctx)

    def _decode_scores(self, ctx: DecodeContext, tau: float) -> torch.Tensor:
        cache = ctx.cache
        b, h, _ = ctx.q.shape
        g = h // cache.kv_heads
        keys = cache.keys().float().repeat_interleave(g, dim=1)  # [B, H, L, d]
        x = torch.einsum("bhd,bhld->bhl", ctx.q.float(), keys) * ctx.scale
        if self.noise_scale:
            heads = torch.arange(h, device=x.device)[None, :, None]
            kpos = cache.positions().repeat_interleave(g, dim=1)
            noise = gumbel_noise(self.seed, ctx.layer, heads, ctx.positions[:, None, None], kpos)
            x = x + self.noise_scale * noise
        valid = cache.valid().repeat_interleave(g, dim=1)
        if ctx.config.sliding_window is not None:
            window = cache.positions() > (ctx.positions[:, None, None] - ctx.config.sliding_window)
            valid = valid & window.repeat_interleave(g, dim=1)
        x = (x / tau).masked_fill(~valid, float("-inf"))
        return torch.softmax(x, dim=-1).nan_to_num(0.0)
