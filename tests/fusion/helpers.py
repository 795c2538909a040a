"""Small random models and prompts for the fusion tests (built in code, fp32, CPU)."""

from __future__ import annotations

import dataclasses

import torch

from mpckv.config import RopeConfig
from mpckv.random_model import random_llama, small_config

ROPES = {
    "default": RopeConfig(),
    "linear": RopeConfig(rope_type="linear", factor=2.0),
    "llama3": RopeConfig(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
}


def make_model(rope: str = "default", layers: int = 3, seed: int = 0):
    cfg = small_config(num_hidden_layers=layers, hidden_size=32, head_dim=8)
    cfg = dataclasses.replace(cfg, rope=ROPES[rope], max_position_embeddings=2048)
    return random_llama(cfg, seed=seed)


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
