"""Secure greedy generation == plaintext greedy generation, token for token, across real parties.

Also the reveal audit: the only thing any party opens is one ``[1, V]`` one-hot per generated token, to
party 1 (the prompt owner) alone.
"""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv.plaintext.model import LlamaModel
from mpckv.protocols.testing import run_parties
from mpckv.random_model import random_llama, small_config

pytestmark = pytest.mark.mpc

VOCAB, NEW = 48, 4
PROMPTS = [[3, 17, 5, 40, 22, 9, 31, 12], [7, 7, 1, 30, 2, 44, 19, 25, 11, 6, 38, 27]]


def _tiny_model(seed: int = 0) -> LlamaModel:
    return random_llama(small_config(vocab_size=VOCAB, rms_norm_eps=1e-5), seed=seed)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("secure_tiny")
    mpckv.save_model(_tiny_model(), path)
    return str(path)


def _party(model_dir: str, prompts: list[list[int]], method: str, params: dict, kv_cache: str) -> dict:
    from mpckv.protocols import audit
    from mpckv.protocols.secure_generate import secure_generate

    out = {"tokens": [], "reveals": [], "bytes": []}
    for p in prompts:
        with audit.recording() as log:
            run = secure_generate(model_dir, p, NEW, method, params, kv_cache=kv_cache)
        out["rank"] = run.rank
        out["tokens"].append(run.tokens)
        out["reveals"].append([(e.shape, e.dst) for e in log])
        out["bytes"].append(run.comm.bytes_total)
        out["kept"] = run.stats.kept_per_layer
    return out


def _plain(model_dir: str, prompts: list[list[int]], method: str, params: dict) -> tuple[list, list]:
    eng = mpckv.Engine(mpckv.load_model(model_dir), method, **params)
    toks, margins = [], []
    for p in prompts:
        s = eng.prefill([p])
        seq = []
        for _ in range(NEW):
            top2 = torch.topk(s.logits[0], 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = s.logits.argmax(-1)
            seq.append(int(nxt))
            eng.decode(s, nxt)
        toks.append(seq)
    return toks, margins


@pytest.mark.parametrize(
    ("world", "protocol", "method", "params", "kv_cache"),
    [
        (2, "beaver", "dense", {}, "stock"),
        (3, "replicated", "dense", {}, "stock"),
        (2, "beaver", "streamingllm", {"sinks": 2, "budget": 6}, "stock"),
        (2, "beaver", "streamingllm", {"sinks": 2, "budget": 6}, "persistent"),
    ],
)
def test_secure_equals_plaintext(model_dir, world, protocol, method, params, kv_cache):
    want, margins = _plain(model_dir, PROMPTS, method, params)
    assert min(margins) > 0.02, "test prompts must have clear argmax margins (fixed-point tolerance)"
    results = run_parties(
        _party, world, protocol=protocol, timeout=300, args=(model_dir, PROMPTS, method, params, kv_cache)
    )
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[1]["tokens"] == want
    assert all(by_rank[r]["tokens"] == [None] * len(PROMPTS) for r in by_rank if r != 1)
    # reveal audit: exactly one [1, V] one-hot per generated token, to party 1 only, on every party
    for r in by_rank.values():
        for log in r["reveals"]:
            assert log == [((1, VOCAB), 1)] * NEW
        assert all(b > 0 for b in r["bytes"])
    if method == "streamingllm":
        assert by_rank[0]["kept"] == [6.0, 6.0]
