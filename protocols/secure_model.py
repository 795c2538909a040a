"""Secret-sharing a model's weights (party 0) and a prompt (party 1).

Party 0 loads the checkpoint and broadcasts only its *config* (shapes are public); every party then
receives secret shares of each weight tensor with ``src=0``. Party 1 broadcasts only the prompt *length*
and shares a one-hot encoding of its tokens with ``src=1``. The resulting :class:`LlamaModel` has
CrypTensor weights and a :class:`~mpckv.protocols.backend.CrypTenBackend`, so the plaintext engine runs it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from mpckv.config import ModelConfig, RopeConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.model import LayerWeights, LlamaModel, layer_shapes
from mpckv.protocols import comm
from mpckv.protocols.backend import CrypTenBackend, SecretTokens
from mpckv.protocols.compat import import_crypten

WEIGHT_PARTY = 0
PROMPT_PARTY = 1


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


def share_model(
    model: LlamaModel | None, config: ModelConfig, src: int = WEIGHT_PARTY, kv_cache: str = "stock"
) -> LlamaModel:
    """Secret-share party ``src``'s weights; other parties pass ``model=None`` and the broadcast config.

    ``kv_cache="persistent"`` keeps K/V *and* the weight matrices with persistent masks
    (:mod:`mpckv.protocols.persistent_cache`, :mod:`mpckv.protocols.persistent_weights`): each is opened
    once as ``M − B`` and every product opens only the other operand. ``"stock"`` keeps CrypTen's
    re-masking Beaver products as the baseline.
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
                setattr(lw, name, PersistentWeight(getattr(lw, name)))
        tied = head is embed
        embed = PersistentWeight(embed)
        head = embed if tied else PersistentWeight(head)
    return LlamaModel(c, embed, layers, norm, head, backend=CrypTenBackend(kv_cache=kv_cache))


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
