"""NOSA rule (Huang et al. 2025): block scores, forced sets, the locality bound, the bias head."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpckv
from mpckv.calibrate import config_signature
from mpckv.calibrate.nosa_bias import NosaBias, load_bias, save_bias
from mpckv.config import ModelConfig
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.base import DecodeContext
from mpckv.plaintext.methods.nosa import Nosa, _pool_windows
from mpckv.registry import get_method

CFG = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
SETTINGS = settings(derandomize=True, deadline=None, max_examples=10)


def make_ctx(n: int, seed: int = 0) -> DecodeContext:
    g = torch.Generator().manual_seed(seed)
    cache = LayerCache(1, 2, 8, torch.float32, torch.device("cpu"))
    cache.append(
        torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g), torch.arange(n)[None]
    )
    return DecodeContext(
        0, CFG, cache, torch.randn(1, 4, 8, generator=g), torch.tensor([n - 1]), 0, 8**-0.5, {}
    )


def random_bias(path, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    b = NosaBias(torch.randn(1, 2, 16, generator=g), torch.randn(1, 2, generator=g), torch.ones(1, 2))
    save_bias(b, path, {"config": config_signature(CFG)})
    return str(path)


def test_registered_and_sizes():
    m = get_method("nosa")
    assert isinstance(m, Nosa) and "2510.13602" in m.paper
    assert m.sizes(4096) == (64, 16, 64, 1, 16, 16)
    assert m.sizes(12) == (3, 1, 4, 1, 1, 1)


def test_pool_windows_matches_naive():
    x = torch.randn(1, 1, 11)
    got = _pool_windows(x, 4, 3)
    for u in range(3):
        js = [j for j in range(4 * u - 1, 4 * u + 4) if 0 <= j < 11]
        assert float(got[0, 0, u]) == max(float(x[0, 0, j]) for j in js)


def test_query_aware_scores_and_incremental_summaries():
    m = Nosa(budget=16, block=8, stride=2, bias="zero")
    ctx = make_ctx(40)
    ksum, _ = m._summaries(ctx, 2)
    for t in range(40, 45):
        ctx.cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([[t]]))
        ksum, _ = m._summaries(ctx, 2)
    k = ctx.cache.keys()
    want = torch.stack([k[:, :, 2 * c : 2 * c + 2].sum(2) for c in range(23)], 2)
    torch.testing.assert_close(ksum[:, :, :23], want)


@settings(derandomize=True, deadline=None, max_examples=5)
@given(n=st.integers(70, 150), seed=st.integers(0, 40))
def test_incremental_window_means_equal_a_fresh_state(n, seed):
    """The cached compressed keys (updated from the changed chunk on) give bit-for-bit the selection and
    window means of a state rebuilt from scratch, across appends that grow the chunk buffers."""
    m = Nosa(budget=64, block=8, stride=2, bias="zero")
    ctx = make_ctx(n, seed)
    g = torch.Generator().manual_seed(seed + 7)
    for t in range(n, n + 24):
        ctx.cache.append(torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g),
                         torch.tensor([[t]]))  # fmt: skip
        ctx.q = torch.randn(1, 4, 8, generator=g)
        got = m.select_blocks(ctx, 64)
        fresh = DecodeContext(0, CFG, ctx.cache, ctx.q, torch.tensor([t]), 0, 8**-0.5, {})
        want = m.select_blocks(fresh, 64)
        assert got is not None and want is not None
        for a, b in zip(got[:3], want[:3], strict=True):
            assert torch.equal(a, b)
        mw = -(-ctx.cache.max_length // 2) - 1
        assert torch.equal(ctx.state["nosa2_kc"][:, :, :mw], fresh.state["nosa2_kc"][:, :, :mw])


@SETTINGS
@given(n=st.integers(70, 200), seed=st.integers(0, 40))
def test_forced_sets_and_locality_bound(n, seed, tmp_path_factory):
    path = random_bias(tmp_path_factory.mktemp("nosa") / "b.safetensors", seed)
    m = Nosa(budget=64, block=8, stride=2, bias=path)  # K = 8 blocks: init 1, window 2, k_q 2
    ctx = make_ctx(n, seed)
    out1 = m.select_blocks(ctx, 64)
    ctx.q = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed + 1))
    out2 = m.select_blocks(ctx, 64)
    assert out1 is not None and out2 is not None
    nb = -(-n // 8)
    for h in range(2):
        f1, f2 = set(out1[0][0, h].tolist()), set(out2[0][0, h].tolist())
        qa1 = set(torch.nonzero(out1[2][0, h]).flatten().tolist())
        qa2 = set(torch.nonzero(out2[2][0, h]).flatten().tolist())
        assert len(f1) == len(f2) == min(8, nb) and sorted(out1[0][0, h].tolist()) == out1[0][0, h].tolist()
        assert {0, nb - 2, nb - 1} <= qa1 and qa1 <= f1 and qa2 <= f2 and len(qa1) == 5
        assert len(f2 - f1) <= len(qa2 - qa1) <= 2


def test_zero_bias_ties_go_to_early_blocks_and_dense_when_budget_covers():
    m = Nosa(budget=64, block=8, stride=2, bias="zero")
    ctx = make_ctx(120, 3)
    out = m.select_blocks(ctx, 64)
    assert out is not None
    f, qa = set(out[0][0, 0].tolist()), set(torch.nonzero(out[2][0, 0]).flatten().tolist())
    rest = sorted(set(range(15)) - qa)[: 8 - len(qa)]
    assert f == qa | set(rest)
    assert Nosa(budget=200, bias="zero").select(make_ctx(120)) is None


def test_bias_file_round_trip_and_shipped_tiny(tmp_path):
    path = random_bias(tmp_path / "b.safetensors")
    b = load_bias(path, CFG)
    v = torch.randn(1, 2, 5, 8)
    x = v.permute(0, 2, 1, 3).reshape(1, 5, 16)
    want = (b.a[0] * torch.nn.functional.softplus(x @ b.w[0].T + b.c[0])).permute(0, 2, 1)
    torch.testing.assert_close(b.bias(0, v), want)
    tiny = mpckv.load_model("tiny")
    assert Nosa().bias_head(tiny.config) is not None and Nosa(bias="zero").bias_head(tiny.config) is None


def test_engine_end_to_end(tiny_random_model):
    p = torch.randint(0, 200, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = Engine(tiny_random_model).generate([p], 4, stop_tokens=[])
    res = Engine(tiny_random_model, "nosa", budget=12).generate([p], 4, stop_tokens=[])
    assert sum(res.stats.read_per_layer) < sum(dense.stats.read_per_layer)
