"""The eval harness on the real-model path: a subword tokenizer with a chat template (tests/chat_tokenizer.py)
on a random checkpoint — token-sized RULER prompts, chat template split at the question, stop tokens,
predictions with both scores, shared prefill equal to per-method prefill, and resume after a crash."""

from __future__ import annotations

import json
import random

import pytest
import torch
from chat_tokenizer import ChatTokenizer

import mpckv
from mpckv.data.synthetic import filler_text
from mpckv.evals import EvalConfig, group, runner, suites


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def small_corpus(monkeypatch):
    text = filler_text(60_000, random.Random(0))
    monkeypatch.setattr(suites, "heldout_text", lambda: text)


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    return mpckv.load_model(path)


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer()


def _cfg(out, **kw):
    base = dict(
        model="unused",
        out=out,
        suites=["passkey", "multihop", "ppl"],
        lengths=[480],
        methods=["dense", "snapkv"],
        budgets=[0.2, 1.0],
        n=3,
        ppl_tokens=16,
        params={"snapkv": {"window": 4}},
        max_new_tokens=6,
        batch_size=2,
    )
    return EvalConfig(**{**base, **kw})


def _run(model, tok, cfg):
    return runner.run_eval(cfg, model=model, tokenizer=tok, model_id="random-chat", plots=False)


def test_chat_grid(model, tok, tmp_path, monkeypatch):
    seen: list[list[int]] = []
    real = mpckv.Engine.record_prefill
    monkeypatch.setattr(mpckv.Engine, "record_prefill", lambda self, ids: seen.extend(ids) or real(self, ids))
    records = _run(model, tok, _cfg(tmp_path))
    assert len(records) == 3 * 3
    # one shared prefill per sample (not per cell): 3 suites x 3 samples
    assert len(seen) == 9
    qa = [r for r in records if r["suite"] != "ppl"]
    assert all(430 <= r["prompt_tokens"] <= 480 and r["metric"] == "contains" for r in qa)
    assert all(r["shared_prefill"] and r["seconds"] > 0 for r in records)
    ppl = [r for r in records if r["suite"] == "ppl"]
    assert all(r["prompt_tokens"] == 480 and r["ppl"] > 1 for r in ppl)
    by = {(r["suite"], r["method"], r["budget"]): r for r in records}
    for suite in ("passkey", "multihop"):
        assert by[(suite, "snapkv", 1.0)]["accuracy"] == by[(suite, "dense", None)]["accuracy"]
    assert by[("ppl", "snapkv", 1.0)]["ppl"] == pytest.approx(by[("ppl", "dense", None)]["ppl"], rel=1e-6)
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    p = next(x for x in preds if x["suite"] == "passkey")
    assert {"prompt_tail", "generated", "answer", "contains", "exact", "score"} <= p.keys()
    assert p["prompt_tail"].endswith("<|im_start|>assistant\nThe pass key is")
    assert not (tmp_path / runner.PARTIAL).exists()
    # the question is fed after the context was compressed: prefilled prompts end before the question
    texts = [tok._tok.decode(ids, skip_special_tokens=False) for ids in seen]
    assert all("What is the pass key?" not in t for t in texts)
    assert any(t.rstrip().endswith("pass key.") or "pass key is" in t for t in texts)
    assert group.stop_tokens(tok, model) == sorted({*model.config.stop_token_ids, *tok.stop_token_ids})


def test_shared_prefill_gives_the_same_results(model, tok, tmp_path, monkeypatch):
    cfg = dict(suites=["needle", "ppl"], methods=["dense", "h2o", "quest"], budgets=[0.3], n=2)
    cfg["params"] = {"quest": {"page_size": 4}}
    shared = _run(model, tok, _cfg(tmp_path / "a", **cfg))
    monkeypatch.setattr(group.Job, "shares_prefill", property(lambda self: False))
    own = _run(model, tok, _cfg(tmp_path / "b", **cfg))
    drop = {"seconds", "shared_prefill"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in shared] == [
        {k: v for k, v in r.items() if k not in drop} for r in own
    ]
    gen = [(tmp_path / d / "predictions.jsonl").read_text() for d in ("a", "b")]
    assert gen[0] == gen[1]


def test_resume_after_a_crash(model, tok, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, suites=["passkey"], n=4, batch_size=1)
    clean = _run(model, tok, _cfg(tmp_path / "clean", suites=["passkey"], n=4, batch_size=1))
    calls = {"n": 0}
    real = group._qa_part

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("power cut")
        return real(*a, **kw)

    monkeypatch.setattr(group, "_qa_part", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        _run(model, tok, cfg)
    assert len((tmp_path / runner.PARTIAL).read_text().splitlines()) == 6  # 6 (cell, sample) parts kept
    results = tmp_path / runner.RESULTS
    assert not results.exists() or json.loads(results.read_text()) == []
    calls["n"] = -100
    again = _run(model, tok, cfg)
    assert calls["n"] == -100 + (3 * 4 - 6)  # only the missing parts were computed
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in clean
    ]
    assert not (tmp_path / runner.PARTIAL).exists()
