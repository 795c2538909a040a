"""SnapKV / PyramidKV / H2O-window under MPC (protocols/snapkv_secure.py) against plaintext, in real parties.

* **Eviction parity** (hypothesis): random prompt queries and keys whose plaintext pooled votes have a
  boundary gap (last kept vs best evicted prefix token) above ``TOL``; the secure eviction keeps exactly
  the plaintext rows (K and V bit-exact, ascending order) on the stock and persistent-mask caches, for
  max/avg pooling and every GQA reduction; the kept count is the plaintext one.
* **Generation parity**: secure greedy generation with PyramidKV equals plaintext token for token on a
  random tiny llama, with the plaintext kept sizes, and reveals only the output tokens.
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
from mpckv.plaintext.methods.base import PrefillContext
from mpckv.plaintext.methods.h2o_window import H2OWindow
from mpckv.plaintext.methods.pyramidkv import PyramidKV
from mpckv.plaintext.methods.scorers import pool_scores, prompt_capacities, reduce_group, window_votes
from mpckv.plaintext.methods.snapkv import SnapKV
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

TOL = 2e-3
VOCAB, NEW, PROMPT_LEN = 48, 3, 40


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


def _quant(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 2**16) / 2**16


def _share(x: torch.Tensor) -> Any:
    with comm.paused():
        return import_crypten().cryptensor(x)


def _reveal(x: Any) -> torch.Tensor:
    with comm.paused():
        return x.get_plain_text().double()


def _plain_votes(m: Any, ctx: PrefillContext) -> torch.Tensor:
    """The pooled, reduced plaintext votes (the reference computation of ``snapkv_compress``)."""
    n = ctx.cache.lengths
    prefix = (n - m.window).clamp_min(0)
    per_head = window_votes(ctx, m.window, per_query_head=True)
    g = per_head.shape[1] // ctx.cache.kv_heads
    kernel, pooling = getattr(m, "kernel_size", 1), getattr(m, "pooling", "max")
    pooled = pool_scores(per_head, kernel, pooling, prefix.repeat_interleave(g, dim=1))
    return reduce_group(pooled, ctx.cache.kv_heads, m.group_reduce)[..., : int(prefix.max())]


def _gap(votes: torch.Tensor, k: int) -> float:
    out = float("inf")
    for row in votes.reshape(-1, votes.shape[-1]):
        vals = torch.sort(row, descending=True).values
        if 0 < k < vals.numel():
            out = min(out, float(vals[k - 1] - vals[k]))
    return out


def check_eviction_parity() -> None:
    from mpckv.protocols import snapkv_secure as ss
    from mpckv.protocols.persistent_cache import PersistentLayerCache
    from mpckv.protocols.secure_cache import SecureLayerCache

    comm.install()
    checked: list[str] = []

    @party_settings(max_examples=12)
    @given(
        seed=st.integers(0, 2**16),
        n=st.integers(16, 40),
        hk=st.sampled_from([1, 2]),
        g=st.sampled_from([1, 2]),
        budget=st.integers(6, 20),
        kernel=st.sampled_from([1, 3, 5]),
        pooling=st.sampled_from(["max", "avg"]),
        reduce=st.sampled_from(["mean", "sum", "max"]),
        variant=st.sampled_from(["snapkv", "pyramidkv", "h2o_window"]),
    )
    def prop(seed, n, hk, g, budget, kernel, pooling, reduce, variant):
        d, window = 8, 4
        cfg = _cfg(2, h=hk * g, hk=hk, d=d)
        gen = torch.Generator().manual_seed(seed)
        m: Any
        if variant == "h2o_window":
            m = H2OWindow(budget=budget, window=window, group_reduce=reduce)
        else:
            cls = PyramidKV if variant == "pyramidkv" else SnapKV
            m = cls(budget=budget, window=window, kernel_size=kernel, pooling=pooling, group_reduce=reduce)
        K = _quant(torch.randn(1, hk, n, d, generator=gen))
        V = _quant(torch.randn(1, hk, n, d, generator=gen))
        Q = _quant(torch.randn(1, hk * g, n, d, generator=gen))
        plain = LayerCache(1, hk, d, torch.float32, torch.device("cpu"))
        plain.append(K, V, torch.arange(n)[None])
        lens = torch.tensor([n])
        ctx = PrefillContext(0, cfg, plain, Q, lens, d**-0.5, {}, None, [], None)
        if isinstance(m, SnapKV):  # PyramidKV's pyramid included
            caps = m.capacities(ctx)
        else:  # H2OWindow's rule (its on_prefill)
            caps = prompt_capacities(ctx, m.resolved_budget.tokens_for)
        cap = int(caps[0, 0])
        if cap < n and cap > window and _gap(_plain_votes(m, ctx), cap - window) <= TOL:
            return
        m.on_prefill(ctx)
        sk, sv, sq = _share(K), _share(V), _share(Q)
        for cache in (SecureLayerCache(1, hk, d), PersistentLayerCache(1, hk, d)):
            cache.append(sk, sv, torch.arange(n)[None])
            sctx = PrefillContext(0, cfg, cache, sq, lens, d**-0.5, {}, None, [], None)
            ss.snapkv_compress(m, sctx, caps)
            assert torch.equal(cache.lengths, plain.lengths)
            assert torch.equal(_reveal(cache.keys()), plain.keys().double())
            assert torch.equal(_reveal(cache.values()), plain.values().double())
        checked.append(variant)

    prop()
    assert set(checked) == {"snapkv", "pyramidkv", "h2o_window"}, f"variants checked: {checked}"


CHECKS = [check_eviction_parity]
register_checks("2pc-snapkv", CHECKS, world_size=2, timeout=300)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_snapkv_secure_in_two_parties(check):
    assert_check_passed("2pc-snapkv", check)


# ======================================================================================== generation
PARAMS: dict[str, Any] = dict(budget=16, window=4, kernel_size=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("snapkv_secure_tiny")
    mpckv.save_model(random_llama(_cfg(3), seed=2), path)
    return str(path)


def test_secure_generation_equals_plaintext(model_dir):
    model = mpckv.load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    plain = mpckv.Engine(model, PyramidKV(**PARAMS)).generate([prompt], max_new_tokens=NEW, stop_tokens=[])
    results = run_parties(
        secure_generation_party, 2, timeout=300, args=(model_dir, prompt, NEW, PyramidKV(**PARAMS))
    )
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[1]["tokens"] == plain.tokens[0]
    assert by_rank[0]["tokens"] is None
    assert by_rank[1]["kept"] == plain.stats.kept_per_layer
    assert max(plain.stats.kept_per_layer) < PROMPT_LEN + NEW  # something was evicted
    for r in by_rank.values():
        assert r["reveals"] == [((1, VOCAB), 1)] * NEW, r["reveals"]
        assert r["by_op"]["static_eviction"] > 0
