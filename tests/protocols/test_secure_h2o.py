"""H2O under MPC (protocols/h2o_secure.py) against plaintext, in real parties.

* **One-entry eviction** (hypothesis): for random rows and accumulated scores (some exactly tied), the
  secure oblivious eviction leaves exactly the rows and scores of the plaintext
  :func:`~mpckv.plaintext.methods.scorers.keep_topk` with ``k = n − 1`` and the last ``k_r`` forced
  (ties keep the lower index), on the stock and the persistent-mask cache.
* **Generation parity**: secure greedy generation with H2O (prefill eviction plus decode-time
  evictions) equals plaintext token for token on a random tiny llama, with the plaintext kept sizes, and
  reveals only the output tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mpckv
from mpckv.config import ModelConfig
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.h2o import H2O
from mpckv.plaintext.methods.scorers import keep_topk
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.testing import (
    assert_check_passed,
    party_settings,
    register_checks,
    run_parties,
    secure_generation_party,
)
from mpckv.random_model import random_llama

pytestmark = pytest.mark.mpc

VOCAB, NEW, PROMPT_LEN = 48, 4, 40


def _cfg(layers: int, h: int = 4, hk: int = 2, d: int = 8) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=h,
        num_key_value_heads=hk,
        head_dim=d,
        rms_norm_eps=1e-5,
    )


def _share(x: torch.Tensor) -> Any:
    with comm.paused():
        return import_crypten().cryptensor(x)


def _reveal(x: Any) -> torch.Tensor:
    with comm.paused():
        return x.get_plain_text().double()


def check_evict_one_parity() -> None:
    from mpckv.protocols import h2o_secure as hs
    from mpckv.protocols.persistent_cache import PersistentLayerCache
    from mpckv.protocols.secure_cache import SecureLayerCache

    comm.install()

    @party_settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**16),
        n=st.integers(3, 20),
        hk=st.sampled_from([1, 2]),
        recent=st.integers(0, 4),
        levels=st.sampled_from([3, 1000]),  # few levels: many exact ties
    )
    def prop(seed, n, hk, recent, levels):
        d = 4
        recent = min(recent, n - 2)
        gen = torch.Generator().manual_seed(seed)
        K = torch.round(torch.randn(1, hk, n, d, generator=gen) * 2**16) / 2**16
        V = torch.round(torch.randn(1, hk, n, d, generator=gen) * 2**16) / 2**16
        S = torch.round(torch.randint(0, levels, (1, hk, n), generator=gen).float() / levels * 2**18) / 2**16
        plain = LayerCache(1, hk, d, torch.float32, torch.device("cpu"))
        plain.append(K, V, torch.arange(n)[None])
        plain.add_meta("s")[:, :, :n] = S
        forced = torch.arange(n) >= n - recent
        keep_topk(plain, S, torch.full((1, hk), n - 1), forced.expand(1, hk, n))
        for cache in (SecureLayerCache(1, hk, d), PersistentLayerCache(1, hk, d)):
            cache.append(_share(K), _share(V), torch.arange(n)[None])
            new_s = hs.evict_one(cache, _share(S), recent)
            assert int(cache.max_length) == n - 1
            assert torch.equal(_reveal(cache.keys()), plain.keys().double())
            assert torch.equal(_reveal(cache.values()), plain.values().double())
            assert torch.equal(_reveal(new_s), plain.meta["s"][:, :, : n - 1].double())

    prop()


CHECKS = [check_evict_one_parity]
register_checks("2pc-h2o", CHECKS, world_size=2, timeout=300)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_h2o_secure_in_two_parties(check):
    assert_check_passed("2pc-h2o", check)


# ======================================================================================== generation
PARAMS: dict[str, Any] = dict(budget=16, recent_fraction=0.25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("h2o_secure_tiny")
    mpckv.save_model(random_llama(_cfg(2), seed=3), path)
    return str(path)


def test_secure_generation_equals_plaintext(model_dir):
    model = mpckv.load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    plain = mpckv.Engine(model, H2O(**PARAMS)).generate([prompt], max_new_tokens=NEW, stop_tokens=[])
    results = run_parties(
        secure_generation_party, 2, timeout=300, args=(model_dir, prompt, NEW, H2O(**PARAMS))
    )
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[1]["tokens"] == plain.tokens[0]
    assert by_rank[0]["tokens"] is None
    assert by_rank[1]["kept"] == plain.stats.kept_per_layer
    for r in by_rank.values():
        assert r["reveals"] == [((1, VOCAB), 1)] * NEW, r["reveals"]
