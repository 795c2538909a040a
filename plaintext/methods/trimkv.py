"""TRIM-KV — learned per-token retention gates, exponential decay, eviction of the least retained.

Bui, Sharma, Lamba, Mishra, Ying. *Cache What Lasts: Token Retention for Memory-Bounded KV Cache in
LLMs.* arXiv 2512.03324, 2025 (official code ngocbh/trimkv, inference only). Gates:
:mod:`mpckv.calibrate.trimkv_gates` (``mpckv train-gates trimkv``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mpckv.calibrate import config_signature, shipped_file
from mpckv.calibrate.trimkv_gates import LayerGate, load_gates, read_meta
from mpckv.config import ModelConfig
from mpckv.errors import CheckpointError, ConfigError
from mpckv.plaintext.methods.allocators import budget_entry_tokens
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext
from mpckv.plaintext.methods.scorers import keep_topk
from mpckv.registry import register_method

LOG_BETA = "trimkv_log_beta"


def _matches(path: Path, signature: dict[str, Any]) -> bool:
    try:
        return read_meta(path).get("config") == signature
    except CheckpointError:
        return False


_CACHE: dict[tuple[str, int, int, str], list[LayerGate]] = {}


def _gates_from_file(path: str, config: ModelConfig) -> list[LayerGate]:
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise ConfigError(f"trimkv: cannot read gates {path}: {exc}") from exc
    key = (path, st.st_mtime_ns, st.st_size, json.dumps(config_signature(config), sort_keys=True))
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = load_gates(path, config)
    return _CACHE[key]


@register_method("trimkv")
@dataclass(kw_only=True)
class TrimKV(KVMethod):
    """Each entry gets ``log β_i`` from a gate when it is written; its retention at time ``t`` is
    ``(t − p_i)·log β_i`` (``p_i`` its position, ``t`` = the newest position + 1).

    Whenever a row holds ``M + buffer_size`` entries or more (after the prompt, and after each decode
    step's attention) it keeps the ``M`` entries of highest retention (ties → lower index), so a row
    oscillates between ``M`` and ``M + buffer_size − 1`` entries. Attention itself is plain.

    Parameters
    ----------
    gates:
        ``"auto"`` (the shipped gates whose model architecture matches, ``mpckv/assets/calibration``), a
        ``.safetensors`` file from ``mpckv train-gates trimkv``, or ``"constant"`` (every
        ``log β = constant_log_beta``: a sliding window).
    constant_log_beta:
        ``log β`` of the constant gates (< 0).
    buffer_size:
        Entries added between compressions (official default 128, example 32).
    sinks, recent:
        First and last entries always kept (official: optional forced window; ``recent = 1`` keeps the
        token just written, which its own attention read).
    budget:
        ``M`` per (sample, KV head): a token count or a ratio of the prompt length.

    Notes
    -----
    Deviations: gate input (value and key pair norms instead of the hidden state, see
    :mod:`mpckv.calibrate.trimkv_gates`); ``t`` per sample (official: ``seen_tokens`` counts padding);
    per-layer-uniform budgets only (no dynamic head/layer competition); evicted tokens never return.
    Under MPC (``ctx.xp.secure``) only ``gates="constant"`` runs: the kept set is then a public function of
    positions and the budget, evicted by public index (local to each party's shares).
    """

    gates: str = "auto"
    constant_log_beta: float = -0.01
    buffer_size: int = 32
    sinks: int = 0
    recent: int = 1

    family = "eviction"
    paper = "Bui et al., arXiv 2512.03324"
    secure = "yes"
    secure_note: ClassVar[str] = (
        "under MPC gates=constant only: retention is then a public function of positions (public-index "
        "eviction); learned gates read K and V, so their retention would be secret (needs a secure top-M)"
    )
    default_budget = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer_size < 1 or self.sinks < 0 or self.recent < 0:
            raise ConfigError("trimkv needs buffer_size >= 1, sinks >= 0 and recent >= 0")
        if not self.constant_log_beta < 0:
            raise ConfigError(f"trimkv: constant_log_beta must be < 0, got {self.constant_log_beta}")

    def check(self, config: ModelConfig) -> None:
        super().check(config)
        self.layer_gates(config)

    def layer_gates(self, config: ModelConfig) -> list[LayerGate] | None:
        """The model's gates (``None`` for constant gates)."""
        if self.gates == "constant":
            return None
        if self.gates == "auto":
            found = shipped_file("trimkv_", ".safetensors", config, _matches)
            if found is None:
                raise ConfigError(
                    "trimkv: no shipped gates for this model; run `mpckv train-gates trimkv --model M --out "
                    "gates.safetensors` and pass --param gates=gates.safetensors (or gates=constant)"
                )
            return _gates_from_file(str(found), config)
        return _gates_from_file(str(Path(self.gates).resolve()), config)

    def _public_log_beta(self, ctx: PrefillContext | DecodeContext, rows: int) -> torch.Tensor:
        """Under MPC: constant gates only; ``log β [B, Hk, rows]`` without reading the secret K, V."""
        if self.gates != "constant":
            raise ConfigError(
                "trimkv under MPC needs gates=constant: learned gates read each token's K and V, so their "
                "retention scores would be secret (a secure top-M is not built)"
            )
        cache = ctx.cache
        return torch.full((cache.batch, cache.kv_heads, rows), self.constant_log_beta, dtype=torch.float32)

    def log_beta(self, ctx: PrefillContext | DecodeContext, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gates = self.layer_gates(ctx.config)
        if gates is None:
            return torch.full(k.shape[:3], self.constant_log_beta, dtype=torch.float32, device=k.device)
        g = gates[ctx.layer]
        return g.log_beta(k.float().cpu(), v.float().cpu()).to(k.device)

    def _compress(self, ctx: PrefillContext | DecodeContext, t: torch.Tensor) -> None:
        cache = ctx.cache
        m = ctx.state["m"]
        trigger = cache.lengths >= m + self.buffer_size
        if not bool(trigger.any()):
            return
        k = torch.where(trigger, m, cache.lengths)
        pos = cache.positions()
        age = (t[:, None, None] - pos).float()
        if ctx.xp is not None and ctx.xp.secure:  # constant gates: log β needs no per-entry metadata
            score = age * self._public_log_beta(ctx, cache.max_length)
        else:
            score = age * cache.meta[LOG_BETA][:, :, : cache.max_length]
        forced = (pos < self.sinks) | (pos >= (t[:, None, None] - self.recent))
        keep_topk(cache, score, k, forced)

    def on_prefill(self, ctx: PrefillContext) -> None:
        cache = ctx.cache
        rows = [
            [
                max(1, budget_entry_tokens(self.resolved_budget, int(n), ctx.layer, h))
                for h in range(cache.kv_heads)
            ]
            for n in ctx.prompt_lengths.tolist()
        ]
        ctx.state["m"] = torch.tensor(rows, dtype=torch.long, device=cache.lengths.device)
        n = cache.max_length
        if ctx.xp is not None and ctx.xp.secure:  # public retention: public-index eviction
            self._public_log_beta(ctx, n)  # checks the gates
        else:
            cache.add_meta(LOG_BETA)[:, :, :n] = self.log_beta(ctx, cache.keys(), cache.values())
        self._compress(ctx, ctx.prompt_lengths.to(cache.lengths.device))

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        cache = ctx.cache
        last = (cache.lengths - 1).clamp_min(0)  # [B, Hk]: the entry just appended
        if ctx.xp is not None and ctx.xp.secure:
            self._compress(ctx, ctx.positions + 1)
            return
        d = cache.head_dim
        idx = last[..., None, None].expand(-1, -1, 1, d)
        k_new = torch.gather(cache.keys(), 2, idx)
        v_new = torch.gather(cache.values(), 2, idx)
        lb = self.log_beta(ctx, k_new, v_new)  # [B, Hk, 1]
        cache.meta[LOG_BETA].scatter_(2, last[..., None], lb)
        self._compress(ctx, ctx.positions + 1)
