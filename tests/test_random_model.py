"""mpckv.random_model: shapes follow the config, weights follow the seed, nonsense arguments are refused."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mpckv
from mpckv.errors import ConfigError
from mpckv.plaintext.model import LlamaModel
from mpckv.random_model import random_llama, small_config


def _same(a: LlamaModel, b: LlamaModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_small_config_defaults_and_overrides():
    cfg = small_config()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 32, 48, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    big = small_config(vocab_size=48, num_hidden_layers=3, rms_norm_eps=1e-5)
    assert (big.vocab_size, big.num_hidden_layers, big.rms_norm_eps, big.hidden_size) == (48, 3, 1e-5, 32)
    with pytest.raises(ConfigError):
        small_config(num_attention_heads=3)  # not a multiple of 2 KV heads


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_shapes_match_config(heads, kv_heads):
    cfg = small_config(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=36,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=6,
    )
    m = random_llama(cfg, seed=1)
    nq, nk = heads * 6, kv_heads * 6
    assert m.config is cfg and len(m.layers) == 3
    assert m.embed_tokens.shape == m.lm_head.shape == (40, 24)
    assert m.lm_head is not m.embed_tokens
    assert torch.equal(m.norm, torch.ones(24))
    for lw in m.layers:
        assert lw.q_proj.shape == (nq, 24) and lw.o_proj.shape == (24, nq)
        assert lw.k_proj.shape == lw.v_proj.shape == (nk, 24)
        assert lw.gate_proj.shape == lw.up_proj.shape == (36, 24) and lw.down_proj.shape == (24, 36)
        assert lw.input_norm.shape == lw.post_norm.shape == (24,)
        assert lw.q_bias is None and lw.k_bias is None and lw.v_bias is None
    assert all(p.dtype == torch.float32 for p in m.parameters())
    # It runs: logits [B, T, V], finite and not flat.
    logits = m(torch.tensor([[1, 5, 7, 2]]))
    assert logits.shape == (1, 4, 40) and torch.isfinite(logits).all()
    assert logits.std() > 0.01


def test_deterministic_per_seed_and_leaves_global_rng_alone():
    cfg = small_config()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = random_llama(cfg, seed=7)
    assert torch.equal(torch.rand(3), before)  # the global generator did not advance
    assert _same(a, random_llama(cfg, seed=7))
    assert not _same(a, random_llama(cfg, seed=8))
    assert not torch.equal(a.layers[0].q_proj, a.layers[1].q_proj)


def test_std_and_norm_std():
    cfg = small_config(hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)
    m = random_llama(cfg, std=0.02, embed_std=0.3, norm_std=0.0)
    assert all(torch.equal(n, torch.ones(64)) for lw in m.layers for n in (lw.input_norm, lw.post_norm))
    assert math.isclose(float(m.layers[0].gate_proj.std()), 0.02, rel_tol=0.1)
    assert math.isclose(float(m.embed_tokens.std()), 0.3, rel_tol=0.1)
    noisy = random_llama(cfg, norm_std=0.1)
    assert math.isclose(float(noisy.layers[0].input_norm.mean()), 1.0, abs_tol=0.05)
    assert not torch.equal(noisy.layers[0].input_norm, torch.ones(64))
    assert torch.equal(noisy.norm, torch.ones(64))


def test_tied_head_round_trips(tmp_path):
    cfg = dataclasses.replace(small_config(num_key_value_heads=1), tie_word_embeddings=True)
    m = random_llama(cfg, seed=2)
    assert m.lm_head is m.embed_tokens
    assert len(m.parameters()) == 2 + 9 * cfg.num_hidden_layers
    mpckv.save_model(m, tmp_path)
    loaded = mpckv.load_model(tmp_path)
    assert loaded.lm_head is loaded.embed_tokens and _same(loaded, m)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.allclose(loaded(ids), m(ids))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"std": 0.0},
        {"std": -0.1},
        {"std": float("nan")},
        {"std": float("inf")},
        {"std": "0.1"},
        {"embed_std": 0},
        {"norm_std": -0.01},
        {"norm_std": float("nan")},
        {"seed": -1},
        {"seed": 2**64},
        {"seed": 1.5},
        {"seed": True},
    ],
)
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        random_llama(small_config(), **kwargs)


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="ModelConfig"):
        random_llama({"vocab_size": 256})  # type: ignore[arg-type]
    for field in ("attention_bias", "mlp_bias"):
        with pytest.raises(ConfigError, match="bias"):
            random_llama(dataclasses.replace(small_config(), **{field: True}))
