"""Secret-sharing a model's weights (party 0) and a prompt (party 1).

Party 0 loads the checkpoint and broadcasts only its *config* (shapes are public); every party then
receives secret shares of each weight tensor with ``src=0``. Party 1 broadcasts only the prompt *length*
and shares a one-hot encoding of its tokens with ``src=1``. The resulting :class:`LlamaModel` has
CrypTensor weights and a :class:`~mpckv.protocols.backend.CrypTenBackend`, so the plaintext engine runs it.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch

from mpckv.config import ModelConfig, RopeConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.backend import TorchBackend
from mpckv.plaintext.model import LayerWeights, LlamaModel, layer_shapes
from mpckv.protocols import comm
from mpckv.protocols.backend import CrypTenBackend, SecretTokens
from mpckv.protocols.compat import import_crypten

WEIGHT_PARTY = 0
PROMPT_PARTY = 1
CALIBRATION_LENGTH = 64
"""Tokens of the public calibration input of :func:`norm_scales` (seeded random ids)."""


def _rank() -> int:
    return int(import_crypten().communicator.get().get_rank())


def broadcast_config(config: ModelConfig | None, src: int = WEIGHT_PARTY) -> ModelConfig:
    """Party ``src`` sends its model config (public) to everyone."""
    comm_ = import_crypten().communicator.get()
    raw = config.to_dict() if _rank() == src and config is not None else None
    raw = comm_.broadcast_obj(raw, src)
    if raw is None:
        raise ConfigError(f"party {src} has no model to share")
    raw["rope"] = RopeConfig(**raw["rope"])
    return ModelConfig(**raw)


def _share(t: torch.Tensor | None, shape: tuple[int, ...], src: int) -> Any:
    crypten = import_crypten()
    plain = t.detach().float() if t is not None and _rank() == src else torch.zeros(shape)
    return crypten.cryptensor(plain, src=src)


class _NormProbe(TorchBackend):
    """Plaintext backend that records the range of every RMSNorm input's per-row mean square."""

    def __init__(self) -> None:
        self.ranges: list[tuple[float, float]] = []

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ms = x.float().pow(2).mean(-1).flatten()
        self.ranges.append((float(ms.min()), float(ms.max())))
        return super().rms_norm(x, weight, eps)


def norm_scales(model: LlamaModel, length: int = CALIBRATION_LENGTH, seed: int = 0) -> list[float]:
    """Public scale hints for every RMSNorm (``2·layers + 1``: input, post-attention, ..., final norm).

    Party 0 runs its plaintext model on a public calibration input (``length`` seeded random token ids)
    and takes, per norm, the geometric mean of the smallest and largest per-row mean square, rounded to
    a power of 4 (so that ``1/sqrt(scale)`` is an exact power of two). Secure RMSNorm divides its input by
    ``sqrt(scale)`` before squaring (:func:`mpckv.protocols.numerics.rms_norm`), so mean squares from
    ``scale·2**-14`` to ``scale·2**14`` are in range. Needed for real models: SmolLM2-135M's first
    position (its attention sink) reaches a mean square of ~10**6 from layer 21 on while other rows sit at
    10–10**3; without the hint the sum of squares of that row is ~2**61 in the ring, far past where
    rsqrt's range reduction and 2-party truncation work. The hints are a function of the weights alone
    and are opened to every party (``docs/SECURITY.md``, "The real model").
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)
    probe = _NormProbe()
    plain = LlamaModel(
        model.config, model.embed_tokens, model.layers, model.norm, model.lm_head, backend=probe
    )
    with torch.no_grad():
        plain(ids)
    out = []
    for lo, hi in probe.ranges:
        mid = math.sqrt(max(lo, 2.0**-30) * max(hi, 2.0**-30))
        out.append(4.0 ** round(math.log(mid, 4)))
    return out


def share_model(
    model: LlamaModel | None,
    config: ModelConfig,
    src: int = WEIGHT_PARTY,
    kv_cache: str = "stock",
    calibrate: bool = True,
) -> LlamaModel:
    """Secret-share party ``src``'s weights; other parties pass ``model=None`` and the broadcast config.

    ``kv_cache="persistent"`` keeps K/V *and* the weight matrices with persistent masks
    (:mod:`mpckv.protocols.persistent_cache`, :mod:`mpckv.protocols.persistent_weights`): each is opened
    once as ``M − B`` and every product opens only the other operand. ``"stock"`` keeps CrypTen's
    re-masking Beaver products as the baseline. ``calibrate`` attaches public RMSNorm scale hints
    (:func:`norm_scales`, computed by party ``src``); ``False`` keeps the unscaled norms.
    """
    with comm.labels(phase="setup", op="share_weights"):
        if _rank() == src and model is None:
            raise ConfigError(f"party {src} must hold the model")
        c = config
        d = c.hidden_size
        shapes = layer_shapes(c)
        present = _present_biases(model, src)
        layers = []
        for i in range(c.num_hidden_layers):
            src_layer = model.layers[i] if model is not None else None
            kw = {}
            for f in fields(LayerWeights):
                if f.name.endswith("bias") and f.name not in present:
                    continue
                kw[f.name] = _share(getattr(src_layer, f.name) if src_layer else None, shapes[f.name], src)
            layers.append(LayerWeights(**kw))
        embed = _share(model.embed_tokens if model else None, (c.vocab_size, d), src)
        norm = _share(model.norm if model else None, (d,), src)
        head = (
            embed
            if c.tie_word_embeddings
            else _share(model.lm_head if model else None, (c.vocab_size, d), src)
        )
    if kv_cache == "persistent":  # persistent masks for the static weights too (see persistent_weights)
        from mpckv.protocols.persistent_weights import PersistentWeight

        matrices = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for lw in layers:
            for name in matrices:
                setattr(lw, name, PersistentWeight(getattr(lw, name), two_sided=False))
        tied = head is embed
        embed = PersistentWeight(embed)
        head = embed if tied else PersistentWeight(head, two_sided=False)
    backend = CrypTenBackend(kv_cache=kv_cache)
    if calibrate:
        _set_norm_scales(backend, model, layers, norm, src)
    return LlamaModel(c, embed, layers, norm, head, backend=backend)


def _set_norm_scales(
    backend: CrypTenBackend, model: LlamaModel | None, layers: list[LayerWeights], norm: Any, src: int
) -> None:
    """Party ``src`` computes :func:`norm_scales` and broadcasts them (public); attach them to the norms."""
    scales = norm_scales(model) if _rank() == src and model is not None else None
    scales = import_crypten().communicator.get().broadcast_obj(scales, src)
    weights = [w for lw in layers for w in (lw.input_norm, lw.post_norm)] + [norm]
    if scales is None or len(scales) != len(weights):
        raise ConfigError(f"party {src} sent {len(scales or [])} norm scales for {len(weights)} norms")
    for w, s in zip(weights, scales, strict=True):
        backend.set_norm_scale(w, float(s))


def _present_biases(model: LlamaModel | None, src: int) -> set[str]:
    """Which optional bias tensors exist (public structure, broadcast by the weight party)."""
    names = None
    if _rank() == src and model is not None:
        names = sorted(
            f.name
            for f in fields(LayerWeights)
            if f.name.endswith("bias") and getattr(model.layers[0], f.name) is not None
        )
    return set(import_crypten().communicator.get().broadcast_obj(names, src))


def share_prompt(ids: list[int] | None, vocab_size: int, src: int = PROMPT_PARTY) -> SecretTokens:
    """Party ``src`` shares its prompt as a secret one-hot; the length becomes public."""
    comm_ = import_crypten().communicator.get()
    with comm.labels(phase="setup", op="share_prompt"):
        n = comm_.broadcast_obj(len(ids) if _rank() == src and ids is not None else None, src)
        if not n:
            raise ConfigError(f"party {src} must provide a non-empty prompt")
        onehot = torch.zeros(1, n, vocab_size)
        if _rank() == src and ids is not None:
            if max(ids) >= vocab_size or min(ids) < 0:
                raise ConfigError(f"prompt token ids must lie in [0, {vocab_size})")
            onehot[0, torch.arange(n), torch.tensor(ids)] = 1.0
        return SecretTokens(import_crypten().cryptensor(onehot, src=src), int(n))
