"""TRIM-KV under MPC with constant gates: a public retention pattern, evicted by public index.

* **Generation parity**: secure greedy generation with ``gates="constant"`` equals plaintext token for
  token on a random tiny llama, with the plaintext kept sizes (evictions happen every ``buffer_size``
  tokens), and reveals only the output tokens.
* Learned gates are refused under MPC (their retention would depend on the secret K, V).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import mpckv
from mpckv.config import ModelConfig
from mpckv.errors import ConfigError
from mpckv.plaintext.methods.trimkv import TrimKV
from mpckv.protocols.testing import run_parties, secure_generation_party
from mpckv.random_model import random_llama

VOCAB, NEW, PROMPT_LEN = 48, 6, 30
PARAMS: dict[str, Any] = dict(budget=12, gates="constant", buffer_size=4, sinks=2)


def _cfg(layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trimkv_secure_tiny")
    mpckv.save_model(random_llama(_cfg(2), seed=4), path)
    return str(path)


@pytest.mark.mpc
def test_secure_generation_equals_plaintext(model_dir):
    model = mpckv.load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    plain = mpckv.Engine(model, TrimKV(**PARAMS)).generate([prompt], max_new_tokens=NEW, stop_tokens=[])
    results = run_parties(
        secure_generation_party, 2, timeout=300, args=(model_dir, prompt, NEW, TrimKV(**PARAMS))
    )
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[1]["tokens"] == plain.tokens[0]
    assert by_rank[0]["tokens"] is None
    assert by_rank[1]["kept"] == plain.stats.kept_per_layer
    assert max(plain.stats.kept_per_layer) < PROMPT_LEN  # something was evicted
    for r in by_rank.values():
        assert r["reveals"] == [((1, VOCAB), 1)] * NEW, r["reveals"]


def test_learned_gates_are_refused_under_mpc():
    ctx = SimpleNamespace(cache=SimpleNamespace(batch=1, kv_heads=2))
    with pytest.raises(ConfigError, match="gates=constant"):
        TrimKV(budget=8, gates="auto")._public_log_beta(ctx, 3)
    lb = TrimKV(budget=8, gates="constant", constant_log_beta=-0.5)._public_log_beta(ctx, 3)
    assert torch.equal(lb, torch.full((1, 2, 3), -0.5))
