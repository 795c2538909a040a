"""Offline A²ATS codebooks: query-weighted k-means over pre-RoPE keys (He et al., ACL 2025 Findings).

Per (layer, KV head): run the model on calibration text, collect the pre-RoPE keys ``k`` and the queries of
the group's heads rotated to the fixed offset ``w`` (``q̃ = RoPE(q_pre, w)``), form ``Hq = Σ q̃ q̃ᵀ``
normalised by the RMS of its entries, factor ``Hq + εI = L Lᵀ`` (Cholesky) and run k-means++ / Lloyd on the
transformed keys ``k L`` (row vectors): ``‖(k − c)L‖² = Σ_q (q̃·(k − c))²`` is the squared logit error, so
the codebook minimises what the scores lose. The file stores, per layer, the codebook in the transformed
space ``[Hk, C, d]`` and ``L [Hk, d, d]``; :mod:`mpckv.plaintext.methods.a2ats` encodes keys with
``argmin_c ‖k L − Ĉ_c‖²`` and scores with ``Ĉ L⁻¹``.

Deviations from the released calibration: synthetic calibration text (the byte-level tasks of
:mod:`mpckv.data.synthetic` for byte models, English prose of :mod:`mpckv.data.prose` otherwise) instead of
fineweb-edu + UUID strings; ``C`` and the amount of text are settings (defaults sized for one CPU thread);
Lloyd iterations are capped (``iters``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpckv.calibrate import config_signature
from mpckv.errors import CheckpointError, ConfigError
from mpckv.plaintext.model import LlamaModel
from mpckv.plaintext.rope import rerotate

__all__ = [
    "A2atsCalibration",
    "calibrate",
    "kmeans",
    "load_codebooks",
    "nearest",
    "query_cholesky",
    "read_meta",
    "save_codebooks",
]


@dataclass
class A2atsCalibration:
    """Settings of one calibration run."""

    codewords: int = 256  # C per (layer, KV head) (paper: 4096)
    seq_len: int = 1024  # tokens per calibration sequence
    sequences: int = 8
    offset: int | None = None  # WRoPE offset w; None: min(2048, max_position_embeddings // 4)
    eps: float = 1e-6
    iters: int = 20  # Lloyd iterations after k-means++
    seed: int = 0


def wrope_offset(cal_offset: int | None, max_positions: int) -> int:
    return int(cal_offset) if cal_offset is not None else min(2048, max(1, max_positions // 4))


def query_cholesky(q: torch.Tensor, eps: float) -> torch.Tensor:
    """``L [d, d]`` with ``L Lᵀ = Hq / rms(Hq) + eps·I`` for queries ``q [n, d]`` (float64 inside)."""
    h = q.double().T @ q.double()
    h = h / h.pow(2).mean().sqrt().clamp_min(1e-30)
    h = h + eps * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(h).float()


def nearest(x: torch.Tensor, codebook: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Index of the nearest codeword (squared L2) for every row of ``x [..., n, d]``; ties (within fp32
    rounding of the distance) → lowest index.

    ``codebook [..., C, d]`` with matching leading dims; blocks of ``block`` rows bound the ``[n, C]``
    distance tile.
    """
    c2 = codebook.float().pow(2).sum(-1)  # [..., C]
    out = []
    for start in range(0, x.shape[-2], block):
        xs = x[..., start : start + block, :].float()
        dist = c2[..., None, :] - 2 * (xs @ codebook.float().transpose(-1, -2))
        # GEMM rounding differs per column, so equal distances may differ in the last bits: values
        # within fp32 rounding of the minimum tie, and the lowest index wins
        scale = xs.pow(2).sum(-1, keepdim=True) + c2.amax(-1, keepdim=True)[..., None]
        low = dist.amin(-1, keepdim=True)
        out.append((dist <= low + 1e-6 * scale).to(torch.uint8).argmax(-1))
    return torch.cat(out, dim=-1) if out else torch.zeros(x.shape[:-1], dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, init: str = "++") -> torch.Tensor:
    """k-means++ seeding (``init="random"``: ``k`` distinct random points) + ``iters`` Lloyd steps on
    ``x [n, d]`` → centroids ``[k, d]`` (fp32).

    With fewer distinct points than ``k`` the spare centroids repeat points (they are never nearest
    earlier than their twin, so encoding still picks the lowest index).
    """
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ConfigError("a2ats calibration: no keys to cluster")
    cent = torch.empty(k, x.shape[1])
    if init == "random":
        pick = torch.randperm(n, generator=gen)[:k]
        cent = x[pick.repeat(-(-k // n))[:k]].clone()
        return _lloyd(x, cent, iters)
    first = int(torch.randint(n, (1,), generator=gen))
    cent[0] = x[first]
    d2 = (x - cent[0]).pow(2).sum(-1)
    for i in range(1, k):
        total = float(d2.sum())
        j = (
            int(torch.multinomial(d2 / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
        cent[i] = x[j]
        d2 = torch.minimum(d2, (x - cent[i]).pow(2).sum(-1))
    return _lloyd(x, cent, iters)


def _lloyd(x: torch.Tensor, cent: torch.Tensor, iters: int) -> torch.Tensor:
    k = cent.shape[0]
    for _ in range(iters):
        ids = nearest(x, cent)
        sums = torch.zeros_like(cent).index_add_(0, ids, x)
        cnt = torch.bincount(ids, minlength=k).float()
        moved = cnt > 0
        cent[moved] = sums[moved] / cnt[moved, None]
    return cent


def _calibration_ids(model: LlamaModel, cal: A2atsCalibration, encode: Callable[[str], list[int]] | None):
    rng = random.Random(cal.seed + 7717)
    seqs = []
    for i in range(cal.sequences):
        if encode is None:
            from mpckv.data.synthetic import TASKS, training_text

            task = list(TASKS)[i % len(TASKS)]
            text, _ = training_text(task, cal.seq_len, rng)
            ids = list(text.encode("utf-8"))
        else:
            from mpckv.data.prose import prose

            text = " ".join(prose(cal.seq_len, rng))
            ids = encode(text)
        seqs.append(ids[: cal.seq_len])
    n = min(len(s) for s in seqs)
    return torch.tensor([s[:n] for s in seqs], dtype=torch.long)


@torch.no_grad()
def calibrate(
    model: LlamaModel,
    cal: A2atsCalibration,
    label: str,
    encode: Callable[[str], list[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Codebooks ``{"layer.i.codebook": [Hk, C, d], "layer.i.chol": [Hk, d, d]}`` and their metadata."""
    from mpckv.plaintext.engine import Engine

    cfg = model.config
    w = wrope_offset(cal.offset, cfg.max_position_embeddings)
    gen = torch.Generator().manual_seed(cal.seed)
    ids = _calibration_ids(model, cal, encode)
    eng = Engine(model, "dense")
    keys: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_hidden_layers)]
    queries: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_hidden_layers)]
    for row in ids:  # one sequence at a time bounds the memory of the record
        rec = eng.record_prefill(row[None])
        t = row.shape[0]
        pos = torch.arange(t)
        for layer in range(cfg.num_hidden_layers):
            k = rec.keys[layer][0].float()  # [Hk, T, d] post-RoPE
            q = rec.queries[layer][0].float()  # [H, T, d]
            keys[layer].append(rerotate(k, -pos.expand(k.shape[:2]), model.inv_freq))
            queries[layer].append(rerotate(q, (w - pos).expand(q.shape[:2]), model.inv_freq))
    hk, g = cfg.num_key_value_heads, cfg.group_size
    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_hidden_layers):
        k_all = torch.cat(keys[layer], dim=1)  # [Hk, N, d]
        q_all = torch.cat(queries[layer], dim=1)  # [H, N, d]
        books, chols = [], []
        for head in range(hk):
            qh = q_all[head * g : (head + 1) * g].reshape(-1, q_all.shape[-1])
            chol = query_cholesky(qh, cal.eps)
            books.append(kmeans(k_all[head] @ chol, cal.codewords, cal.iters, gen))
            chols.append(chol)
        out[f"layer.{layer}.codebook"] = torch.stack(books).contiguous()
        out[f"layer.{layer}.chol"] = torch.stack(chols).contiguous()
    meta = {
        "method": "a2ats",
        "model": label,
        "config": config_signature(cfg),
        "offset": w,
        "calibration": asdict(cal),
        "tokens": int(ids.numel()),
    }
    return out, meta


def save_codebooks(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> None:
    """Write codebooks (safetensors, metadata under ``"mpckv"``) atomically: a temp file, then rename."""
    import os

    from safetensors.torch import save_file

    from mpckv.io import check_writable

    dest = check_writable(path, "codebook file")
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"mpckv": json.dumps(meta)})
    os.replace(tmp, dest)


def read_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(json.loads((fh.metadata() or {}).get("mpckv", "{}")))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"a2ats: cannot read codebooks {path}: {exc}") from exc


def load_codebooks(path: str | Path, signature: dict[str, Any]) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """Per layer ``(codebook [Hk, C, d], chol [Hk, d, d])`` and the offset ``w`` of a codebook file."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    if meta.get("config") != signature:
        raise ConfigError(f"a2ats: codebooks {path} were calibrated for another model architecture")
    flat = load_file(str(path))
    layers = signature["num_hidden_layers"]
    try:
        books: list[tuple[torch.Tensor, ...]] = [
            (flat[f"layer.{i}.codebook"], flat[f"layer.{i}.chol"]) for i in range(layers)
        ]
    except KeyError as exc:
        raise CheckpointError(f"a2ats: codebooks {path} lack {exc}") from exc
    return books, int(meta["offset"])


def run(model_name: str, cal: A2atsCalibration, out: str | Path) -> dict[str, Any]:
    """Load ``model_name``, calibrate and write ``out``; returns a summary for the CLI."""
    from mpckv.calibrate import model_label
    from mpckv.checkpoint import load_model

    t0 = time.perf_counter()
    model = load_model(model_name)
    encode = None
    if model.config.vocab_size != 256:
        from mpckv.tokenizer import load_tokenizer

        encode = load_tokenizer(model.source or model_name, model.config.vocab_size).encode
    tensors, meta = calibrate(model, cal, model_label(model_name), encode)
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    save_codebooks(tensors, meta, out)
    return {"out": str(out), "offset": meta["offset"], "codewords": cal.codewords, "seconds": meta["seconds"]}
