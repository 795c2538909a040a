"""Fixtures of the fault-injection suite (issue 16); helpers live in ``helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer random Llama checkpoint (fast under MPC)."""
    from mpckv.checkpoint import save_model
    from mpckv.random_model import random_llama, small_config

    cfg = small_config(
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    out = tmp_path_factory.mktemp("small") / "ckpt"
    save_model(random_llama(cfg), out)
    return out
