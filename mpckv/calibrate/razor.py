"""RazorAttention head identification: induction and echo scores on repeated random-token sequences.

Tang et al., *RazorAttention: Efficient KV Cache Compression Through Retrieval Heads*, ICLR 2025
(arXiv 2407.15891). The input is one start token followed by a random-token segment of length ``SEG``
repeated ``R`` times. For every query position ``i`` in segments ``2 … R`` a head's *echo* score is its
attention to ``i − SEG`` (the previous occurrence of the current token) and its *induction* score its
attention to ``i − SEG + 1`` (the token that followed it). Scores are averaged over those positions and
over the calibration sequences, reduced to KV heads by the maximum over the GQA group, and ranked over all
(layer, KV head) pairs: the retrieval set is the top ``induction_ratio`` by induction ∪ the top
``echo_ratio`` by echo.

Deviations: short segments (default 256 × 4 instead of 2500 × 4, so that a 0.5B model calibrates in
minutes on one CPU thread) averaged over a few sequences; at least one head per criterion is chosen even
when ``ratio · L · Hk`` rounds to 0 (small models).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpckv.calibrate import config_signature
from mpckv.errors import ConfigError
from mpckv.plaintext.model import LlamaModel

_CHUNK = 256


@dataclass
class RazorCalibration:
    """Hyper-parameters of the head identification."""

    seg_len: int = 256
    repeats: int = 4
    num_sequences: int = 2
    induction_ratio: float = 0.14
    echo_ratio: float = 0.01
    seed: int = 0
    #: Token ids are drawn from ``[low, high)``; ``None`` = the lower-case letters (97–122) for a 256-entry
    #: byte vocabulary (random bytes, even random printable ASCII, are out of distribution for the byte
    #: model, whose copy task uses letters; its induction heads then barely fire), else the whole vocabulary.
    low: int | None = None
    high: int | None = None

    def token_range(self, vocab: int) -> tuple[int, int]:
        lo = self.low if self.low is not None else (97 if vocab == 256 else 0)
        hi = self.high if self.high is not None else (123 if vocab == 256 else vocab)
        if not 0 <= lo < hi <= vocab:
            raise ConfigError(f"razorattention calibration: token range [{lo}, {hi}) not inside [0, {vocab})")
        return lo, hi

    def __post_init__(self) -> None:
        if self.seg_len < 2 or self.repeats < 2 or self.num_sequences < 1:
            raise ConfigError(
                "razorattention calibration needs seg_len >= 2, repeats >= 2, num_sequences >= 1"
            )
        for name in ("induction_ratio", "echo_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"razorattention calibration: {name} must be in [0, 1]")


def offset_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, seg: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean causal attention of the queries in segments ``2…R`` to ``i − seg + 1`` and to ``i − seg``.

    ``q [H, T, d]`` and ``k [Hk, T, d]`` are one sequence's post-RoPE queries and keys (token 0 is the start
    token, segment ``r`` covers ``[1 + r·seg, 1 + (r + 1)·seg)``). Returns ``(induction, echo)`` per KV head
    ``[Hk]`` (maximum over the query heads of each group).
    """
    h, t, _ = q.shape
    hk = k.shape[0]
    g = h // hk
    kf = k.float().repeat_interleave(g, dim=0)
    first = 1 + seg
    ind = torch.zeros(h, dtype=torch.float64)
    echo = torch.zeros(h, dtype=torch.float64)
    for start in range(first, t, _CHUNK):
        rows = torch.arange(start, min(start + _CHUNK, t))
        x = (q[:, rows].float() @ kf.transpose(-1, -2)) * scale  # [H, c, T]
        x = x.masked_fill(torch.arange(t)[None, None, :] > rows[None, :, None], float("-inf"))
        lse = torch.logsumexp(x, dim=-1)  # [H, c]
        at = torch.arange(len(rows))
        ind += torch.exp(x[:, at, rows - seg + 1] - lse).sum(-1).double()
        echo += torch.exp(x[:, at, rows - seg] - lse).sum(-1).double()
    n = max(t - first, 1)
    return (ind / n).view(hk, g).amax(-1).float(), (echo / n).view(hk, g).amax(-1).float()


def calibration_input(vocab: int, cal: RazorCalibration, index: int, start_token: int | None) -> torch.Tensor:
    """Sequence ``index``: the start token then one random segment repeated ``cal.repeats`` times."""
    gen = torch.Generator().manual_seed(cal.seed * 1000 + index)
    lo, hi = cal.token_range(vocab)
    seg = torch.randint(lo, hi, (cal.seg_len,), generator=gen)
    start = torch.tensor([start_token if start_token is not None else int(seg[0])])
    return torch.cat([start, seg.repeat(cal.repeats)])


@torch.no_grad()
def head_scores(model: LlamaModel, cal: RazorCalibration) -> tuple[torch.Tensor, torch.Tensor]:
    """``(induction, echo)`` scores ``[L, Hk]`` of every (layer, KV head), averaged over the sequences."""
    cfg = model.config
    ind = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads)
    echo = torch.zeros_like(ind)
    bos = cfg.bos_token_id if isinstance(cfg.bos_token_id, int) else None
    for s in range(cal.num_sequences):
        ids = calibration_input(cfg.vocab_size, cal, s, bos)[None].to(model.device)
        t = ids.shape[1]
        positions = torch.arange(t, device=model.device)[None]
        lengths = torch.tensor([t], device=model.device)
        hidden = model.embed(ids)
        for layer in range(cfg.num_hidden_layers):
            q, k, v = model.qkv(layer, hidden, positions)
            a, e = offset_scores(q[0].cpu(), k[0].cpu(), model.scale, cal.seg_len)
            ind[layer] += a / cal.num_sequences
            echo[layer] += e / cal.num_sequences
            attn = model.xp.prefill_attention(q, k, v, lengths, model.scale, cfg.sliding_window)
            hidden = model.finish_layer(layer, hidden, attn)
    return ind, echo


def _top(scores: torch.Tensor, ratio: float) -> set[tuple[int, int]]:
    count = expected_count(ratio, scores.numel())
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:count]
    hk = scores.shape[1]
    return {(int(i) // hk, int(i) % hk) for i in order}


def select_heads(
    induction: torch.Tensor, echo: torch.Tensor, induction_ratio: float, echo_ratio: float
) -> list[list[int]]:
    """Sorted ``[layer, kv_head]`` pairs, top ``induction_ratio`` (induction) ∪ top ``echo_ratio`` (echo)."""
    chosen = _top(induction, induction_ratio) | _top(echo, echo_ratio)
    return [list(p) for p in sorted(chosen)]


def calibrate(model: LlamaModel, cal: RazorCalibration, model_label: str = "") -> dict[str, Any]:
    """Run the identification and return the JSON-ready calibration record."""
    ind, echo = head_scores(model, cal)
    return {
        "method": "razorattention",
        "model_id": model_label,
        "config": config_signature(model.config),
        "calibration": asdict(cal),
        "induction": [[round(float(x), 6) for x in row] for row in ind],
        "echo": [[round(float(x), 6) for x in row] for row in echo],
        "retrieval_heads": select_heads(ind, echo, cal.induction_ratio, cal.echo_ratio),
    }


def save(record: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def load_heads(path: str | Path, num_layers: int, kv_heads: int) -> frozenset[tuple[int, int]]:
    """The retrieval heads of a calibration file, checked against the model's sizes."""
    try:
        record = json.loads(Path(path).read_text())
        pairs = record["retrieval_heads"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"razorattention: cannot read retrieval heads from {path}: {exc}") from exc
    return check_heads(pairs, num_layers, kv_heads)


def check_heads(pairs: Any, num_layers: int, kv_heads: int) -> frozenset[tuple[int, int]]:
    out = set()
    for p in pairs:
        if not (isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, int) for x in p)):
            raise ConfigError(f"razorattention: heads must be [layer, kv_head] pairs, got {p!r}")
        layer, head = p
        if not (0 <= layer < num_layers and 0 <= head < kv_heads):
            raise ConfigError(
                f"razorattention: head {p} out of range for {num_layers} layers × {kv_heads} KV heads"
            )
        out.add((layer, head))
    return frozenset(out)


def expected_count(ratio: float, total: int) -> int:
    """Heads chosen by one criterion among ``total`` (at least one when the ratio is positive)."""
    return max(1, round(ratio * total)) if ratio > 0 else 0


__all__ = [
    "RazorCalibration",
    "calibrate",
    "check_heads",
    "expected_count",
    "head_scores",
    "load_heads",
    "offset_scores",
    "save",
    "select_heads",
]
