"""NOSA's query-agnostic importance ``b_t = A_g · softplus(W_Δ v_t + c)_g`` and its offline fit.

Huang et al., *NOSA: Native and Offloadable Sparse Attention*, arXiv 2510.13602. In NOSA ``W_Δ`` and ``A``
are trained with the whole model (continued pre-training). We cannot retrain the checkpoints, so we fit
only the bias head on a frozen model (``mpckv train-bias nosa``): per layer and KV head, ``b_t`` regresses
the log of the attention mass token ``t`` of the context later receives from the question part of a
synthetic training sequence, relative to a uniform share (``log(Σ_i p_it / Σ_i 1/(i+1) + 0.01)``,
averaged over the group's heads), up to a per-head constant (softmax and ranking ignore it: it is fitted
but not stored).

Deviations: a per-KV-head offset ``c`` inside the softplus; ``A`` starts at 1 (the paper's 0 gives
``W_Δ`` no gradient when the model itself is frozen); the regression target is ours (NOSA learns ``b``
end to end).
"""

from __future__ import annotations

import json
import random
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

__all__ = ["BiasTraining", "NosaBias", "load_bias", "read_meta", "save_bias", "train_bias"]


@dataclass
class NosaBias:
    """Per-layer weights: ``w [L, Hk, Hk·d]``, ``c [L, Hk]``, ``a [L, Hk]``."""

    w: torch.Tensor
    c: torch.Tensor
    a: torch.Tensor

    def bias(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        """``b [B, Hk, T]`` for values ``v [B, Hk, T, d]`` (every KV head's value feeds every head)."""
        b, hk, t, d = v.shape
        x = v.float().permute(0, 2, 1, 3).reshape(b, t, hk * d)
        z = x @ self.w[layer].transpose(0, 1) + self.c[layer]  # [B, T, Hk]
        return (self.a[layer] * F.softplus(z)).permute(0, 2, 1)


@dataclass
class BiasTraining:
    """Fit settings: sequences of ``seq_len`` bytes/tokens from the synthetic tasks, Adam on MSE."""

    seq_len: int = 512
    sequences: int = 16
    steps: int = 300
    lr: float = 1e-2
    ctx_frac: float = 0.6
    seed: int = 0


def save_bias(bias: NosaBias, path: str | Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    flat = {"w": bias.w.detach().float().contiguous(), "c": bias.c.detach().float().contiguous(),
            "a": bias.a.detach().float().contiguous()}  # fmt: skip
    save_file(flat, str(path), metadata={"mpckv": json.dumps(meta)})


def read_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(json.loads((fh.metadata() or {}).get("mpckv", "{}")))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"nosa: cannot read bias weights {path}: {exc}") from exc


def load_bias(path: str | Path, config: ModelConfig) -> NosaBias:
    """Weights written by :func:`save_bias`, checked against ``config``."""
    from safetensors.torch import load_file

    if read_meta(path).get("config") != config_signature(config):
        raise ConfigError(f"nosa: bias weights {path} were trained for another model architecture")
    flat = load_file(str(path))
    return NosaBias(flat["w"], flat["c"], flat["a"])


def _targets(record: Any, layer: int, start_q: int, hk: int, scale: float) -> torch.Tensor:
    """``[B, Hk, Tc]``: log attention mass from queries ``>= start_q`` on keys ``< start_q`` vs uniform."""
    q, k = record.queries[layer].float(), record.keys[layer].float()  # [B, H, T, d], [B, Hk, T, d]
    b, h, t, d = q.shape
    qs = q[:, :, start_q:].reshape(b, hk, h // hk, t - start_q, d)
    s = (qs @ k[:, :, None].transpose(-1, -2)) * scale  # [B, Hk, G, Tq, T]
    rows = torch.arange(start_q, t)
    s = s.masked_fill(torch.arange(t)[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)[..., :start_q].mean(dim=2).sum(dim=2)  # [B, Hk, Tc]
    uniform = (1.0 / (rows + 1).float()).sum()
    return torch.log(p / uniform + 1e-2)


def train_bias(
    model: LlamaModel, cfg: BiasTraining, out: str | Path, label: str = "", encode: Any = None
) -> dict[str, Any]:
    """Fit the bias head of every layer on the frozen ``model`` and write it to ``out`` (safetensors)."""
    from mpckv.data.synthetic import training_text
    from mpckv.plaintext.engine import Engine
    from mpckv.tokenizer import ByteTokenizer

    mc = model.config
    if encode is None:
        if mc.vocab_size != 256:
            raise ConfigError(
                "train-bias nosa: pass the model's tokenizer (encode) for a non-byte vocabulary"
            )
        encode = ByteTokenizer().encode
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    tasks = ("kv_retrieval", "passkey", "needle", "multihop")
    ids = []
    for i in range(cfg.sequences):
        text, _ = training_text(tasks[i % len(tasks)], cfg.seq_len, rng, cfg.ctx_frac)
        ids.append(list(encode(text))[: cfg.seq_len])
    t = min(len(x) for x in ids)
    batch = torch.tensor([x[:t] for x in ids], device=model.device)
    record = Engine(model).record_prefill(batch)
    start_q = int(t * cfg.ctx_frac)
    hk, d = mc.num_key_value_heads, mc.head_dim
    g = torch.Generator().manual_seed(cfg.seed)
    ws, cs, as_, losses = [], [], [], []
    for layer in range(mc.num_hidden_layers):
        with torch.no_grad():
            y = _targets(record, layer, start_q, hk, model.scale)
            v = record.values[layer][:, :, :start_q].float()
        w = (0.01 * torch.randn(hk, hk * d, generator=g)).requires_grad_()
        c = torch.zeros(hk, requires_grad=True)
        a = torch.ones(hk, requires_grad=True)
        shift = y.mean(dim=(0, 2)).clone().requires_grad_()  # free per-head offset, not shipped
        opt = torch.optim.Adam([w, c, a, shift], lr=cfg.lr)
        for _ in range(cfg.steps):
            pred = NosaBias(w[None], c[None], a[None]).bias(0, v) + shift[None, :, None]
            loss = F.mse_loss(pred, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        loss = loss.detach()
        base = y.var(dim=(0, 2), unbiased=False).mean()  # the best constant (b ≡ 0) per head
        ws.append(w.detach())
        cs.append(c.detach())
        as_.append(a.detach())
        losses.append({"layer": layer, "mse": round(float(loss), 4), "mse_zero_bias": round(float(base), 4)})
    bias = NosaBias(torch.stack(ws), torch.stack(cs), torch.stack(as_))
    meta = {"method": "nosa", "model": label, "config": config_signature(mc), "training": asdict(cfg),
            "fit": losses}  # fmt: skip
    save_bias(bias, out, meta)
    return {"out": str(out), "fit": losses, "seconds": round(time.perf_counter() - t0, 2)}
