"""Models for ``mpckv bench plaintext``: checkpoints, named models and ``random:SPEC`` shapes.

``random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024`` builds a random-weight Llama of
that shape (:func:`mpckv.random_model.random_llama`): the attention of Llama-3-8B with few layers and a
small MLP, so that 32K–128K-token caches fit in memory. The weights are noise; only speed and memory are
meaningful on such a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.model import LlamaModel

__all__ = ["BenchModel", "RANDOM_KEYS", "load_bench_model", "parse_random_spec"]

#: ``random:`` keys → :class:`~mpckv.config.ModelConfig` fields (and their defaults).
RANDOM_KEYS: dict[str, tuple[str, int]] = {
    "layers": ("num_hidden_layers", 2),
    "heads": ("num_attention_heads", 32),
    "kv_heads": ("num_key_value_heads", 8),
    "head_dim": ("head_dim", 128),
    "hidden": ("hidden_size", 4096),
    "ffn": ("intermediate_size", 1024),
    "vocab": ("vocab_size", 1024),
    "positions": ("max_position_embeddings", 1 << 20),
}


@dataclass
class BenchModel:
    """A loaded model plus what the bench needs to know about it."""

    model: LlamaModel
    label: str
    has_reference: bool  # a real checkpoint: the transformers row makes sense


def parse_random_spec(spec: str) -> dict[str, int]:
    """``"layers=2,heads=32"`` → ``{"num_hidden_layers": 2, "num_attention_heads": 32, …}`` (defaults filled).

    Raises
    ------
    ConfigError
        An unknown key or a value that is not a positive integer.
    """
    out = {field: default for field, default in RANDOM_KEYS.values()}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or key.strip() not in RANDOM_KEYS:
            raise ConfigError(
                f"random model spec: expected KEY=INT with KEY in {sorted(RANDOM_KEYS)}, got {part!r}"
            )
        try:
            num = int(val)
        except ValueError:
            raise ConfigError(f"random model spec: {key.strip()} must be an integer, got {val!r}") from None
        if num < 1:
            raise ConfigError(f"random model spec: {key.strip()} must be >= 1, got {num}")
        out[RANDOM_KEYS[key.strip()][0]] = num
    return out


def load_bench_model(spec: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> BenchModel:
    """``tiny``, a checkpoint directory / GGUF, a named model (``smollm2``) or ``random:SPEC``."""
    if spec.startswith("random:") or spec == "random":
        from mpckv.random_model import random_llama, small_config

        sizes = parse_random_spec(spec.partition(":")[2])
        positions = sizes.pop("max_position_embeddings")
        cfg = dataclasses.replace(small_config(**sizes), max_position_embeddings=positions)
        model = random_llama(cfg, seed=seed, std=0.02, embed_std=0.5)
        if dtype != torch.float32 or device != "cpu":
            model = model.to(device=device, dtype=dtype)
        return BenchModel(model, spec, has_reference=False)
    from mpckv.checkpoint import load_model

    model = load_model(spec, dtype=dtype, device=device)
    return BenchModel(model, spec, has_reference=True)
