"""Quest under MPC (protocols/quest_secure.py) against the plaintext Quest, in real parties.

* **Selection parity** (hypothesis): random keys and queries whose plaintext page-score boundary gap
  (between the last picked and the best unpicked page) exceeds ``TOL``; the secure step gathers exactly
  the plaintext tokens (``K[idx], V[idx]``, bit-exact) on the stock and the persistent-mask cache, over
  appended steps (incrementally widened page bounds), for every GQA reduction and with a sink page.
* **Generation parity**: secure greedy generation with Quest equals plaintext token for token on a
  random tiny llama; read sizes equal the plaintext ones; the only reveals are the output tokens, to
  party 1.
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
from mpckv.plaintext.methods.base import DecodeContext
from mpckv.plaintext.methods.quest import Quest
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


def _gap(scores: torch.Tensor, k: int, forced: torch.Tensor) -> float:
    """Smallest gap between the last picked and the best unpicked free page over rows."""
    out = float("inf")
    for row, frc in zip(
        scores.reshape(-1, scores.shape[-1]), forced.reshape(-1, scores.shape[-1]), strict=True
    ):
        vals = torch.sort(row[~frc], descending=True).values
        m = k - int(frc.sum())
        if 0 < m < vals.numel():
            out = min(out, float(vals[m - 1] - vals[m]))
    return out


def check_selection_parity() -> None:
    from mpckv.protocols import quest_secure as qs
    from mpckv.protocols.persistent_cache import PersistentLayerCache
    from mpckv.protocols.secure_cache import SecureLayerCache

    comm.install()
    checked: list[str] = []

    @party_settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**16),
        n=st.integers(20, 48),
        hk=st.sampled_from([1, 2]),
        g=st.sampled_from([1, 2]),
        page=st.sampled_from([2, 4]),
        budget=st.integers(6, 16),
        reduce=st.sampled_from(["max", "mean", "sum"]),
        sink=st.booleans(),
        steps=st.integers(1, 2),
    )
    def prop(seed, n, hk, g, page, budget, reduce, sink, steps):
        d = 8
        cfg = _cfg(1, h=hk * g, hk=hk, d=d)
        gen = torch.Generator().manual_seed(seed)
        method = Quest(budget=budget, page_size=page, skip_layers=0, group_reduce=reduce, sink_page=sink)
        total = n + steps
        K = _quant(torch.randn(1, hk, total, d, generator=gen))
        V = _quant(torch.randn(1, hk, total, d, generator=gen))
        Q = _quant(torch.randn(steps, 1, hk * g, d, generator=gen))
        plain = LayerCache(1, hk, d, torch.float32, torch.device("cpu"))
        plain.append(K[:, :, :n], V[:, :, :n], torch.arange(n)[None])
        caches = [SecureLayerCache(1, hk, d), PersistentLayerCache(1, hk, d)]
        sk, sv = _share(K), _share(V)
        for c in caches:
            c.append(sk[:, :, :n], sv[:, :, :n], torch.arange(n)[None])
        states: list[dict] = [{}, {}]
        for step in range(steps):
            m = n + step + 1
            plain.append(K[:, :, m - 1 : m], V[:, :, m - 1 : m], torch.tensor([[m - 1]]))
            for c in caches:
                c.append(sk[:, :, m - 1 : m], sv[:, :, m - 1 : m], torch.tensor([[m - 1]]))
            zero = torch.zeros(1, dtype=torch.long)
            ctx = DecodeContext(0, cfg, plain, Q[step], zero, step, 1.0, {}, [], None)
            sel = method.select(ctx)
            for cache, state in zip(caches, states, strict=True):  # keep the secure bounds tracked
                sctx = DecodeContext(0, cfg, cache, _share(Q[step]), zero, step, 1.0, state, [], None)
                choice = qs.select_pages(method, sctx)
                assert (choice is None) == (sel is None)
                if sel is None:
                    continue
                scores = method.page_scores(ctx)
                pages = scores.shape[-1]
                forced = torch.zeros_like(scores, dtype=torch.bool)
                forced[..., pages - 1] = True
                forced[..., 0] |= sink
                k = int(method.page_budget(plain.lengths, 0)[0, 0])
                if _gap(scores, k, forced) <= TOL:
                    continue
                idx = sel.index
                k_rows, v_rows, lengths, keep = qs.gather_pages(cache, choice)
                assert keep is None and int(lengths[0, 0]) == idx.shape[-1] == choice.rows
                gi = idx[..., None].expand(1, hk, idx.shape[-1], d)
                assert torch.equal(_reveal(k_rows), plain.keys().double().gather(2, gi))
                assert torch.equal(_reveal(v_rows), plain.values().double().gather(2, gi))
                checked.append(reduce)

    prop()
    assert checked, "no example reached a non-dense selection with clear gaps"


CHECKS = [check_selection_parity]
register_checks("2pc-quest", CHECKS, world_size=2, timeout=300)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_quest_secure_in_two_parties(check):
    assert_check_passed("2pc-quest", check)


# ======================================================================================== generation
PARAMS: dict[str, Any] = dict(budget=12, page_size=4, skip_layers=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quest_secure_tiny")
    mpckv.save_model(random_llama(_cfg(3), seed=1), path)
    return str(path)


def test_secure_generation_equals_plaintext(model_dir):
    model = mpckv.load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    eng = mpckv.Engine(model, Quest(**PARAMS))
    plain = eng.generate([prompt], max_new_tokens=NEW, stop_tokens=[])
    want = plain.tokens[0]
    results = run_parties(
        secure_generation_party, 2, timeout=300, args=(model_dir, prompt, NEW, Quest(**PARAMS))
    )
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[1]["tokens"] == list(want)
    assert by_rank[0]["tokens"] is None
    for r in by_rank.values():
        assert r["reveals"] == [((1, VOCAB), 1)] * NEW, r["reveals"]
        assert r["by_op"]["selection"] > 0 and r["by_op"]["gather"] > 0
    assert by_rank[1]["read"] == plain.stats.read_per_layer  # public sizes equal the plaintext ones
    assert by_rank[1]["read"][1] < PROMPT_LEN  # the selection did read fewer entries
