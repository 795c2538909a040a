"""RazorAttention under MPC (protocols/razor_secure.py) against plaintext, in real parties.

* **Generation parity** (hypothesis): for random retrieval-head sets, sinks, budgets, compensation and
  decode modes (``grow`` / ``slide``), secure greedy generation on the stock and the persistent-mask cache
  equals plaintext token for token, with the plaintext kept and read sizes per layer, reveals only the
  output tokens (application-level reveal audit; the masked openings are only the persistent cache's
  rows and product operands), and spends less softmax / ``p·V`` traffic than dense whenever a head was
  compressed. Hypothesis runs inside the parties (same derandomized examples on each), in one launch.
* **Split cache** (one party, local): a layer split into two groups gives back the same padded K/V, per-head
  lengths and head order as the cache it came from.
* **Plaintext slide oracle**: with ``decode="slide"`` a non-retrieval row holds sinks, the last ``L_h``
  positions and one compensation entry whose key is the mean of the layer-0 keys of every dropped position
  (layer-0 keys do not depend on the method, so a dense run gives them).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mpckv
from mpckv.config import ModelConfig
from mpckv.plaintext.methods.razorattention import RazorAttention
from mpckv.random_model import random_llama

VOCAB, NEW, PROMPT_LEN, LAYERS, KV_HEADS = 48, 4, 26, 2, 2
DENSE_LEN = PROMPT_LEN + NEW - 1  # entries a dense cache holds at the end (the last token is not fed)
PAIRS = [(layer, h) for layer in range(LAYERS) for h in range(KV_HEADS)]


def _cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=8,
        rms_norm_eps=1e-5,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("razor_secure_tiny")
    mpckv.save_model(random_llama(_cfg(), seed=7), path)
    return str(path)


def _prompt(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()


config_st = st.fixed_dictionaries(
    {
        "heads": st.lists(st.sampled_from(PAIRS), unique=True, max_size=3).map(
            lambda x: [list(p) for p in x]
        ),
        "sinks": st.integers(0, 3),
        "budget": st.integers(5, 12),
        "compensation": st.sampled_from(["mean", "none"]),
        "decode": st.sampled_from(["grow", "slide"]),
    }
)


def _share(model_dir: str, kv_cache: str) -> Any:
    """Party 0 shares the model once per cache kind (as ``secure_generate`` does per call)."""
    from mpckv.protocols.compat import import_crypten
    from mpckv.protocols.secure_model import broadcast_config, share_model

    rank = int(import_crypten().communicator.get().get_rank())
    model = mpckv.load_model(model_dir) if rank == 0 else None
    config = broadcast_config(model.config if model is not None else None, 0)
    return share_model(model, config, 0, kv_cache=kv_cache)


def _generation(shared: Any, prompt: list[int], method: Any) -> dict[str, Any]:
    """One private generation on an already shared model (the body of ``secure_generate``)."""
    from mpckv.protocols import audit, comm
    from mpckv.protocols.compat import import_crypten
    from mpckv.protocols.masked_matmul import recording_openings
    from mpckv.protocols.secure_model import share_prompt

    link = import_crypten().communicator.get()
    rank = int(link.get_rank())
    comm.install()
    comm.reset()
    with audit.recording() as log, recording_openings() as opened:
        ids = share_prompt(prompt if rank == 1 else None, VOCAB, 1)
        res = mpckv.Engine(shared, method).generate(ids, NEW, stop_tokens=[])
    with comm.paused():
        totals = comm.system_totals()
    mine = res.tokens[0] if rank == 1 else None
    # the output party hands its (already revealed) tokens to the test on every party, so that both
    # parties assert alike and hypothesis shrinks in step; this is test plumbing, not part of the protocol
    return {
        "tokens": link.broadcast_obj(mine, 1),
        "mine": mine,
        "kept": res.stats.kept_per_layer,
        "read": res.stats.read_per_layer,
        "reveals": [(e.shape, e.dst) for e in log],
        "opened": sorted({o.what for o in opened}),
        "by_op": {k: v["bytes"] for k, v in totals.by_op.items()},
    }


def _parity_party(model_dir: str) -> dict[str, Any]:
    """The hypothesis parity test, run inside every party (same derandomized examples everywhere)."""
    import traceback

    from mpckv.protocols.compat import import_crypten

    rank = int(import_crypten().communicator.get().get_rank())
    model = mpckv.load_model(model_dir)  # the plaintext reference (test only: every party computes it)
    shared = {kv: _share(model_dir, kv) for kv in ("stock", "persistent")}
    dense = {kv: _generation(shared[kv], _prompt(0), "dense")["by_op"] for kv in shared}
    seen: list[dict[str, Any]] = []

    @settings(max_examples=3, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(params=config_st, kv_cache=st.sampled_from(["stock", "persistent"]), seed=st.integers(0, 3))
    @example(  # a split layer, compensation folded every step, persistent masks
        params=dict(heads=[[0, 1], [1, 0]], sinks=2, budget=7, compensation="mean", decode="slide"),
        kv_cache="persistent",
        seed=1,
    )
    @example(  # not compressed at prefill: the split happens when the short heads fill up
        params=dict(heads=[[0, 1]], sinks=2, budget=28, compensation="mean", decode="slide"),
        kv_cache="persistent",
        seed=2,
    )
    @example(
        params=dict(heads=[[1, 0]], sinks=3, budget=9, compensation="mean", decode="grow"),
        kv_cache="stock",
        seed=3,
    )
    def check(params: dict[str, Any], kv_cache: str, seed: int) -> None:
        prompt = _prompt(seed)
        ref = mpckv.Engine(model, RazorAttention(**params)).generate([prompt], NEW, stop_tokens=[])
        r = _generation(shared[kv_cache], prompt, RazorAttention(**params))
        seen.append({"params": params, "kv_cache": kv_cache, "kept": r["kept"]})
        assert r["tokens"] == ref.tokens[0]
        assert r["mine"] == (ref.tokens[0] if rank == 1 else None)
        assert r["kept"] == ref.stats.kept_per_layer
        assert r["read"] == ref.stats.read_per_layer
        assert r["reveals"] == [((1, VOCAB), 1)] * NEW
        # masked openings: only the persistent cache's own (rows under fresh masks, product operands)
        assert set(r["opened"]) <= {"k_rows", "v_rows", "operand"}, r["opened"]
        if min(ref.stats.kept_per_layer) < DENSE_LEN:  # some head was compressed: less work
            for op in ("softmax", "pv"):
                assert r["by_op"][op] < dense[kv_cache][op], op

    try:
        check()
        failure = None
    except Exception:
        failure = traceback.format_exc()
    return {"rank": rank, "failure": failure, "seen": seen, "split": _split_check()}


def _split_check() -> dict[str, Any]:
    """Split a random secret layer cache into groups [1] and [0, 2]; compare the padded views."""
    from mpckv.protocols.backend import CrypTenBackend
    from mpckv.protocols.compat import import_crypten
    from mpckv.protocols.razor_secure import HeadSplitCache
    from mpckv.protocols.secure_cache import SecureLayerCache

    crypten = import_crypten()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 3, 7, 4, generator=g), torch.randn(1, 3, 7, 4, generator=g)
    whole = SecureLayerCache(1, 3, 4)
    whole.append(crypten.cryptensor(k, src=0), crypten.cryptensor(v, src=0), torch.arange(7)[None])
    a, b = SecureLayerCache(1, 1, 4), SecureLayerCache(1, 2, 4)
    a.append(
        crypten.cryptensor(k[:, [1]], src=0), crypten.cryptensor(v[:, [1]], src=0), torch.arange(7)[None]
    )
    keep = torch.tensor([0, 5, 6])
    b.append(
        crypten.cryptensor(k[:, [0, 2]][:, :, keep], src=0),
        crypten.cryptensor(v[:, [0, 2]][:, :, keep], src=0),
        keep[None],
    )
    split = HeadSplitCache([([1], a), ([0, 2], b)], 3, 4, CrypTenBackend())
    q = torch.randn(1, 6, 4, generator=g)
    out, _ = split.attend(crypten.cryptensor(q, src=0), 0.5, None, False)
    return {
        "k": split.keys().get_plain_text().float(),
        "lengths": split.lengths,
        "pos": split.positions(),
        "out": out.get_plain_text().float(),
        "ref": (k, v, q, keep),
    }


@pytest.fixture(scope="module")
def parties(model_dir):
    from mpckv.protocols.testing import run_parties

    return run_parties(_parity_party, 2, timeout=900, args=(model_dir,))


@pytest.mark.mpc
def test_secure_generation_equals_plaintext(parties):
    for p in parties:
        assert p["failure"] is None, p["failure"]
    seen = parties[0]["seen"]
    assert seen == parties[1]["seen"]
    assert {s["kv_cache"] for s in seen} == {"stock", "persistent"}
    assert any(min(s["kept"]) < DENSE_LEN for s in seen)  # the examples do compress


@pytest.mark.mpc
def test_split_cache_views_and_group_attention(parties):
    r = parties[0]["split"]
    k, v, q, keep = r["ref"]
    assert r["lengths"].tolist() == [[3, 7, 3]]
    assert r["pos"][0, 1].tolist() == list(range(7)) and r["pos"][0, 0, :3].tolist() == keep.tolist()
    torch.testing.assert_close(r["k"][0, 1], k[0, 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(r["k"][0, 2, :3], k[0, 2, keep], atol=1e-3, rtol=0)
    assert bool((r["k"][0, 0, 3:] == 0).all())
    # reference: query heads 2h, 2h+1 attend KV head h over its kept rows only
    ref = torch.empty(6, 4)
    for h in range(3):
        rows = torch.arange(7) if h == 1 else keep
        for qh in (2 * h, 2 * h + 1):
            p = torch.softmax(0.5 * q[0, qh] @ k[0, h, rows].T, -1)
            ref[qh] = p @ v[0, h, rows]
    torch.testing.assert_close(r["out"][0], ref, atol=2e-3, rtol=0)


def test_plaintext_slide_oracle():
    model = random_llama(_cfg(), seed=7)
    prompt, steps = _prompt(1), 9
    sinks, budget = 2, 8
    window = budget - sinks - 1
    m = RazorAttention(heads=[[0, 1]], budget=budget, sinks=sinks, decode="slide")
    eng, dense = mpckv.Engine(model, m), mpckv.Engine(model)
    s, ds = eng.prefill([prompt]), dense.prefill([prompt])
    feed = torch.randint(0, VOCAB, (steps,), generator=torch.Generator().manual_seed(5))
    for i in range(steps):
        eng.decode(s, feed[i : i + 1])
        dense.decode(ds, feed[i : i + 1])
        n = PROMPT_LEN + i + 1
        lc, dc = s.cache.layers[0], ds.cache.layers[0]
        assert lc.lengths.tolist() == [[budget, n]]
        pos = sorted(lc.pos[0, 0, : lc.lengths[0, 0]].tolist())
        assert pos == [0, 1, sinks, *range(n - window, n)]  # the compensation entry carries position N0
        torch.testing.assert_close(lc.k[0, 0, sinks], dc.k[0, 0, sinks : n - window].mean(0))
        torch.testing.assert_close(lc.v[0, 0, sinks], dc.v[0, 0, sinks : n - window].mean(0))
        torch.testing.assert_close(lc.k[0, 1, :n], dc.k[0, 1, :n])  # the retrieval head keeps everything
