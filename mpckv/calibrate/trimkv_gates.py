"""TRIM-KV retention gates and their gate-only distillation (``mpckv train-gates trimkv``).

Bui, Sharma, Lamba, Mishra, Ying. *Cache What Lasts: Token Retention for Memory-Bounded KV Cache in
LLMs* (TRIM-KV), arXiv 2512.03324. A small MLP per (layer, KV head) maps each token's features to a
retention rate ``β ∈ (0, 1)``; the token's weight at age ``a`` is ``β^a``. Training freezes the model and
fits only the gates: the student is the model with *soft* eviction — the logit of query ``i`` on key
``j`` gets ``(i − j)·log β_j`` — and the loss is the forward KL from the dense model's next-token
distribution plus ``λ · mean_i relu(Σ_j α_ij − M) / M`` (the expected kept count above the memory ``M``).

Deviations: (1) the gate reads the token's value and the rotation-invariant pair norms of its key (the
official ``rg2/rg3`` variants read ``[k; v]``; the layer's hidden state, the default ``rg`` input, is not
exposed to KV methods here); (2) one small MLP per KV head (hidden 64) instead of one ``D→512→Hk`` MLP per
layer; (3) the output bias starts at 5 (official 10: β ≈ 1) so that a few hundred CPU steps can move it;
(4) the capacity term is divided by ``M``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mpckv.calibrate import config_signature
from mpckv.config import ModelConfig
from mpckv.errors import CheckpointError, ConfigError
from mpckv.plaintext.model import LlamaModel


def gate_features(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[..., d + d/2]``: the value and the norms of the key's rotary pairs (unchanged by RoPE)."""
    half = k.shape[-1] // 2
    kf = k.float()
    pair = torch.sqrt(kf[..., :half] ** 2 + kf[..., half:] ** 2 + 1e-12)
    return torch.cat([v.float(), pair], dim=-1)


@dataclass
class LayerGate:
    """Weights of one layer's gates: ``w1 [Hk, F, h]``, ``b1 [Hk, h]``, ``w2 [Hk, h]``, ``b2 [Hk]``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def log_beta(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``log β [B, Hk, T]`` (all ≤ 0) for keys/values ``[B, Hk, T, d]``."""
        x = gate_features(k, v)
        hid = F.silu(torch.einsum("bhtf,hfo->bhto", x, self.w1) + self.b1[None, :, None])
        r = torch.einsum("bhto,ho->bht", hid, self.w2) + self.b2[None, :, None]
        return F.logsigmoid(r)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]


def init_gates(config: ModelConfig, hidden: int, bias: float, seed: int) -> list[LayerGate]:
    """Fresh gates: small random first layer, zero second layer, output bias ``bias``."""
    g = torch.Generator().manual_seed(seed)
    hk, d = config.num_key_value_heads, config.head_dim
    feat = d + d // 2
    out = []
    for _ in range(config.num_hidden_layers):
        out.append(
            LayerGate(
                w1=torch.randn(hk, feat, hidden, generator=g) / math.sqrt(feat),
                b1=torch.zeros(hk, hidden),
                w2=torch.zeros(hk, hidden),
                b2=torch.full((hk,), float(bias)),
            )
        )
    return out


def save_gates(gates: list[LayerGate], path: str | Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    flat = {}
    for i, lg in enumerate(gates):
        for name, t in zip(("w1", "b1", "w2", "b2"), lg.tensors(), strict=True):
            flat[f"layer.{i}.{name}"] = t.detach().float().contiguous()
    save_file(flat, str(path), metadata={"mpckv": json.dumps(meta)})


def read_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(json.loads((fh.metadata() or {}).get("mpckv", "{}")))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"trimkv: cannot read gates {path}: {exc}") from exc


def load_gates(path: str | Path, config: ModelConfig) -> list[LayerGate]:
    """Gates from a file written by :func:`save_gates`, checked against ``config``."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    if meta.get("config") != config_signature(config):
        raise ConfigError(f"trimkv: gates {path} were trained for another model architecture")
    flat = load_file(str(path))
    try:
        return [
            LayerGate(*(flat[f"layer.{i}.{n}"] for n in ("w1", "b1", "w2", "b2")))
            for i in range(config.num_hidden_layers)
        ]
    except KeyError as exc:
        raise CheckpointError(f"trimkv: gates {path} miss tensor {exc}") from exc


# ---------------------------------------------------------------------- training
@dataclass
class GateTraining:
    """Gate-only distillation settings."""

    memory: int = 128
    seq_len: int = 512
    steps: int = 300
    minutes: float = 8.0
    lr: float = 3e-3
    capacity_weight: float = 1.0
    hidden: int = 64
    batch: int = 4
    bias_init: float = 5.0
    answer_weight: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.memory, self.seq_len, self.steps, self.hidden, self.batch) < 1 or self.minutes <= 0:
            raise ConfigError(
                "train-gates: memory, seq-len, steps, hidden, batch and minutes must be positive"
            )


TASKS = ("passkey", "kv_retrieval", "multihop", "needle", "docqa")


def training_sequences(
    encode: Any, n: int, seq_len: int, seed: int, answer_weight: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, weights)`` ``[n, seq_len]``: synthetic long-context samples ending with their question and
    answer (front-filled with filler text or cut at the front), and per-position loss weights
    (``answer_weight`` on the question and answer, 1 elsewhere)."""
    import random

    from mpckv.data.synthetic import SEP, filler_text, make_sample

    rows, weights = [], []
    for i in range(n):
        s = make_sample(TASKS[i % len(TASKS)], seq_len, seed * 100_003 + i)
        tail = list(encode(SEP + s.question + s.answer))
        ids = list(encode(s.context)) + tail
        if len(ids) < seq_len:
            ids = (
                list(encode(filler_text(seq_len, random.Random(seed + i)) + " "))[: seq_len - len(ids)] + ids
            )
        ids = ids[-seq_len:]
        while len(ids) < seq_len:
            ids = ids[:1] + ids
        w = [1.0] * (seq_len - len(tail)) + [answer_weight] * min(len(tail), seq_len)
        rows.append(ids)
        weights.append(w[-seq_len:])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(weights)


def soft_forward(
    model: LlamaModel, ids: torch.Tensor, gates: list[LayerGate] | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``[B, T, V]`` with soft retention ``(i − j)·log β_j`` added to the logits (dense if no gates),
    and each layer's expected kept count per query ``[B, Hk, T]``."""
    cfg = model.config
    b, t = ids.shape
    pos = torch.arange(t)
    positions = pos.expand(b, t)
    causal = pos[None, :] <= pos[:, None]
    age = (pos[:, None] - pos[None, :]).clamp_min(0).float()  # [T, T]
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    hidden = model.embed(ids)
    kept: list[torch.Tensor] = []
    for layer in range(cfg.num_hidden_layers):
        q, k, v = model.qkv(layer, hidden, positions)
        x = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * model.scale  # [B, H, T, T]
        if gates is not None:
            lb = gates[layer].log_beta(k, v)  # [B, Hk, T]
            log_alpha = age[None, None] * lb[:, :, None, :]  # [B, Hk, T, T]
            alpha = torch.exp(log_alpha) * causal
            kept.append(alpha.sum(-1))
            x = x + log_alpha.repeat_interleave(g, 1)
        x = x.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(x, dim=-1) @ v.repeat_interleave(g, 1)
        hidden = model.finish_layer(layer, hidden, attn)
    return model.logits(hidden), kept


def distill_loss(
    model: LlamaModel,
    ids: torch.Tensor,
    gates: list[LayerGate],
    memory: int,
    weight: float,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """``(loss, kl, mean kept)`` of one batch (KL averaged with ``token_weights [B, T]``)."""
    with torch.no_grad():
        teacher = torch.log_softmax(model(ids).float(), -1)
    student, kept = soft_forward(model, ids, gates)
    kl = F.kl_div(torch.log_softmax(student.float(), -1), teacher, log_target=True, reduction="none")
    w = token_weights if token_weights is not None else torch.ones(ids.shape)
    kl = (kl.sum(-1) * w).sum() / w.sum()
    cap = torch.stack([F.relu(c - memory).mean() for c in kept]).mean() / memory
    mean_kept = float(torch.stack([c[..., -1].detach().mean() for c in kept]).mean())
    return kl + weight * cap, float(kl.detach()), mean_kept


def train_gates(
    model: LlamaModel, cfg: GateTraining, out: str | Path, label: str = "", encode: Any = None
) -> dict[str, Any]:
    """Train gates for ``model`` (frozen) and save them to ``out``; returns a summary.

    ``encode`` (text → token ids) defaults to the byte tokenizer, which only fits byte-vocabulary models.
    """
    from mpckv.tokenizer import ByteTokenizer

    if encode is None:
        if model.config.vocab_size != 256:
            raise ConfigError(
                "train-gates trimkv: pass the model's tokenizer (encode) for a non-byte vocabulary"
            )
        encode = ByteTokenizer().encode
    for p in model.parameters():
        p.requires_grad_(False)
    gates = init_gates(model.config, cfg.hidden, cfg.bias_init, cfg.seed)
    params = [t.requires_grad_(True) for lg in gates for t in lg.tensors()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    t0 = time.perf_counter()
    log: list[dict[str, float]] = []
    step = 0
    while step < cfg.steps and time.perf_counter() - t0 < cfg.minutes * 60:
        ids, tw = training_sequences(
            encode, cfg.batch, cfg.seq_len, cfg.seed * 7919 + step + 1, cfg.answer_weight
        )
        loss, kl, kept = distill_loss(model, ids, gates, cfg.memory, cfg.capacity_weight, tw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0 or step == 1:
            log.append(
                {
                    "step": step,
                    "loss": round(float(loss.detach()), 5),
                    "kl": round(kl, 5),
                    "kept": round(kept, 1),
                }
            )
    seconds = round(time.perf_counter() - t0, 1)
    meta = {
        "method": "trimkv",
        "model_id": label,
        "config": config_signature(model.config),
        "training": asdict(cfg),
        "steps_done": step,
        "seconds": seconds,
        "final": log[-1] if log else {},
    }
    save_gates(gates, out, meta)
    return {"out": str(out), "steps": step, "seconds": seconds, "log": log[-3:]}
