"""Small random-weight Llama models for tests, demos and benchmarks.

The weights are Gaussian noise, not a trained model: the logits carry no meaning, but the shapes, the
layer loop and the numerics are those of a real checkpoint, which is all that a comparison of two runs
of the same model (plaintext against secure, one KV method against another) needs. Nothing here touches
the network or the disk; pass the model to :func:`mpckv.save_model` for a checkpoint directory.
"""

from __future__ import annotations

import math

import torch

from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.model import LayerWeights, LlamaModel

__all__ = ["random_llama", "small_config"]


def small_config(
    *,
    vocab_size: int = 256,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 8,
    rms_norm_eps: float = 1e-6,
) -> ModelConfig:
    """A small Llama architecture for :func:`random_llama`: by default byte vocabulary (256), hidden size
    32, 2 layers, 4 query and 2 KV heads of dimension 8 (not the config of the shipped ``"tiny"`` model).

    Any size can be overridden; :class:`~mpckv.config.ModelConfig` checks the result (positive sizes,
    query heads a multiple of KV heads, even ``head_dim``) and raises :class:`~mpckv.errors.ConfigError`.
    """
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=rms_norm_eps,
    )


def _check_std(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def random_llama(
    config: ModelConfig,
    *,
    seed: int = 0,
    std: float = 0.15,
    embed_std: float = 0.5,
    norm_std: float = 0.1,
) -> LlamaModel:
    """A :class:`~mpckv.plaintext.model.LlamaModel` of ``config`` with random fp32 weights on the CPU.

    For tests, demos and benchmarks only: the weights are i.i.d. Gaussian noise, not a trained model.

    Parameters
    ----------
    config:
        Architecture. The head is the embedding itself when ``config.tie_word_embeddings``. Biases are
        not generated, so ``config.attention_bias`` and ``config.mlp_bias`` must be false.
    seed:
        Seed (``0 <= seed < 2**64``) of the private generator the weights are drawn from (the global RNG
        is left alone); the same seed and arguments give the same weights.
    std:
        Standard deviation of every projection matrix (q, k, v, o, gate, up, down).
    embed_std:
        Standard deviation of the token embedding and the (untied) output head; the default is larger
        than ``std`` so that the logits are not flat.
    norm_std:
        RMSNorm weights of the layers are ``1 + norm_std * noise`` (exactly 1 when 0). The final norm is 1.

    Raises
    ------
    ConfigError
        A standard deviation that is not finite and positive (``norm_std`` may be 0), a seed out of
        range, or a config with biases.
    """
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    _check_std("std", std)
    _check_std("embed_std", embed_std)
    _check_std("norm_std", norm_std, allow_zero=True)
    if config.attention_bias or config.mlp_bias:
        raise ConfigError("random_llama does not generate biases; use attention_bias=mlp_bias=False")

    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm_weight(d: int) -> torch.Tensor:
        return 1 + w(d, scale=norm_std) if norm_std > 0 else torch.ones(d)

    c = config
    d, ff = c.hidden_size, c.intermediate_size
    nq, nk = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    # Draw order (per layer: input norm, q, k, v, o, post norm, gate, up, down; then embedding, head) is
    # part of the contract: the models the tests pin by seed depend on it.
    layers = [
        LayerWeights(
            input_norm=norm_weight(d),
            q_proj=w(nq, d),
            k_proj=w(nk, d),
            v_proj=w(nk, d),
            o_proj=w(d, nq),
            post_norm=norm_weight(d),
            gate_proj=w(ff, d),
            up_proj=w(ff, d),
            down_proj=w(d, ff),
        )
        for _ in range(c.num_hidden_layers)
    ]
    embed = w(c.vocab_size, d, scale=embed_std)
    head = embed if c.tie_word_embeddings else w(c.vocab_size, d, scale=embed_std)
    return LlamaModel(c, embed, layers, torch.ones(d), head)
