"""The evaluation harness (``mpckv.evals``, ``mpckv eval | fidelity | report``) on a random checkpoint.

Small and fast: lengths 128–256, n = 2–3, a filler-text stand-in for the held-out ppl corpus.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import mpckv
from mpckv.cli import main
from mpckv.data.synthetic import filler_text
from mpckv.evals import EvalConfig, fidelity, runner, suites
from mpckv.evals.config import parse_budgets, parse_method_params

RECORD_TYPES = {
    "suite": str,
    "length": int,
    "method": str,
    "mode": str,
    "n": int,
    "seed": int,
    "model": str,
    "params": dict,
    "kept_fraction": float,
    "read_fraction": float,
    "cache_bytes": int,
    "live_cache_bytes": int,
    "dense_cache_bytes": int,
    "seconds": float,
    "max_new_tokens": int,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two intra-op threads on a shared 2-core machine are ~20x slower than one for these tiny shapes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def small_corpus(monkeypatch):
    """Reading the real held-out slice of the standard library takes seconds; use seeded filler text."""
    text = filler_text(20_000, random.Random(0))
    monkeypatch.setattr(suites, "heldout_text", lambda: text)


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt):
    return mpckv.load_model(ckpt)


def _config(ckpt, out, **kw):
    base = dict(
        model=ckpt,
        out=out,
        suites=["passkey", "needle", "ppl"],
        lengths=[256],
        methods=["dense", "snapkv"],
        budgets=[0.1, 1.0],
        n=3,
        ppl_tokens=32,
        params={"snapkv": {"window": 8}},
    )
    return EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def grid(ckpt, tmp_path_factory):
    """One query-agnostic run: passkey, needle (ragged questions → several extend groups) and ppl."""
    out = tmp_path_factory.mktemp("eval")
    text = filler_text(20_000, random.Random(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(suites, "heldout_text", lambda: text)
        cfg = _config(ckpt, out)
        records = runner.run_eval(cfg)
    return cfg, records, out


def test_record_schema_and_files(grid):
    cfg, records, out = grid
    assert len(records) == 3 * (1 + 2)  # per suite: dense once, snapkv at two budgets
    for r in records:
        for key, typ in RECORD_TYPES.items():
            assert isinstance(r[key], typ), (key, r[key])
        assert r["mode"] == "query-agnostic" and r["n"] == 3 and r["length"] == 256
        assert (r["budget"] is None) == (r["method"] == "dense")
        assert 0 < r["kept_fraction"] <= 1 and 0 < r["read_fraction"] <= 1.001
        assert r["live_cache_bytes"] <= r["cache_bytes"]
        if r["suite"] == "ppl":
            assert r["accuracy"] is None and math.isfinite(r["ppl"]) and r["ppl"] > 1
        else:
            assert isinstance(r["accuracy"], float) and 0 <= r["accuracy"] <= 1 and r["ppl"] is None
    dense = [r for r in records if r["method"] == "dense"]
    assert all(r["kept_fraction"] == 1.0 and abs(r["read_fraction"] - 1) < 1e-3 for r in dense)
    small = [r for r in records if r["budget"] == 0.1]
    assert all(r["kept_fraction"] < 0.5 and r["live_cache_bytes"] < r["dense_cache_bytes"] for r in small)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == records
    for name in ("results.md", "predictions.jsonl", "meta.json", "plot_passkey.png", "plot_ppl.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "## passkey" in md and "## ppl" in md and "`snapkv` (window=8) | 0.1" in md
    assert (out / "plot_needle.png").read_bytes()[:4] == b"\x89PNG"


def test_full_budget_matches_dense(grid):
    _, records, out = grid
    by = {(r["suite"], r["method"], r["budget"]): r for r in records}
    for suite in ("passkey", "needle"):
        assert by[(suite, "snapkv", 1.0)]["accuracy"] == by[(suite, "dense", None)]["accuracy"]
    assert by[("ppl", "snapkv", 1.0)]["ppl"] == pytest.approx(by[("ppl", "dense", None)]["ppl"], rel=1e-6)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    gen = {(p["suite"], p["method"], p["budget"], p["i"]): p.get("generated") for p in preds}
    for i in range(3):
        assert gen[("passkey", "snapkv", 1.0, i)] == gen[("passkey", "dense", None, i)]


def test_rerun_skips_done_cells(grid, monkeypatch):
    cfg, records, out = grid
    calls = []
    real = runner.run_group

    def spy(model, tok, cfg, jobs, **kw):
        calls.extend(j.cell for j in jobs)
        return real(model, tok, cfg, jobs, **kw)

    monkeypatch.setattr(runner, "run_group", spy)
    again = runner.run_eval(_config(cfg.model, out), plots=False)
    assert calls == [] and again == records
    more = runner.run_eval(_config(cfg.model, out, suites=["passkey"], budgets=[0.1, 0.3]), plots=False)
    assert [(c.method, c.budget) for c in calls] == [("snapkv", 0.3)]
    assert len(more) == 3 and len(json.loads((out / "results.json").read_text())) == len(records) + 1
    # a different seed or n is a different cell
    runner.run_eval(
        _config(cfg.model, out, suites=["passkey"], methods=["dense"], params={}, seed=1), plots=False
    )
    assert len(calls) == 2


def test_query_agnostic_prefills_context_only(ckpt, model, tmp_path, monkeypatch):
    seen = {"prefill": [], "extend": []}
    real_prefill, real_extend = mpckv.Engine.record_prefill, mpckv.Engine.extend

    def prefill(self, ids):
        seen["prefill"].append([bytes(x).decode() for x in ids])
        return real_prefill(self, ids)

    def extend(self, session, toks, logits="all"):
        seen["extend"].append(tuple(toks.shape))
        return real_extend(self, session, toks, logits=logits)

    monkeypatch.setattr(mpckv.Engine, "record_prefill", prefill)  # the shared dense prefill
    monkeypatch.setattr(mpckv.Engine, "extend", extend)
    cfg = _config(ckpt, tmp_path, suites=["needle"], methods=["dense"], params={}, lengths=[128])
    runner.run_eval(cfg, model=model, model_id="random", plots=False)
    prompts = [p for batch in seen["prefill"] for p in batch]
    assert len(prompts) == 3 and all(p.endswith("\n\n") and "magic number for" in p for p in prompts)
    assert all("What is" not in p for p in prompts)  # the question arrives after compression
    assert sum(b for b, _ in seen["extend"]) == 3


def test_prefill_cache_reused_across_runs(ckpt, model, tmp_path, monkeypatch):
    """``--prefill-cache``: a second run over the same prompts (other methods, another output directory) loads
    every batch's dense prefill instead of recording it, and its results equal a run without the cache."""
    recorded = []
    real = mpckv.Engine.record_prefill

    def spy(self, ids):
        recorded.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(mpckv.Engine, "record_prefill", spy)
    store = tmp_path / "records"
    kw = dict(suites=["passkey"], lengths=[128], budgets=[0.3], batch_size=2, params={})
    first = _config(ckpt, tmp_path / "a", methods=["dense", "h2o"], prefill_cache=str(store), **kw)
    runner.run_eval(first, model=model, model_id="random", plots=False)
    assert recorded == [2, 1] and len(list(store.glob("*.pt"))) == 2
    cached = _config(ckpt, tmp_path / "b", methods=["snapkv", "quest"], prefill_cache=str(store), **kw)
    with_cache = runner.run_eval(cached, model=model, model_id="random", plots=False)
    assert recorded == [2, 1]  # nothing recorded again
    plain_cfg = _config(ckpt, tmp_path / "c", methods=["snapkv", "quest"], **kw)
    plain = runner.run_eval(plain_cfg, model=model, model_id="random", plots=False)
    assert recorded == [2, 1, 2, 1]

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("seconds", "timestamp", "command", "wall_s")}

    assert [strip(r) for r in with_cache] == [strip(r) for r in plain]
    preds = [(tmp_path / d / "predictions.jsonl").read_text() for d in ("b", "c")]
    assert preds[0] == preds[1]
    # another model id is another key: recorded afresh
    runner.run_eval(_config(ckpt, tmp_path / "d", methods=["dense"], prefill_cache=str(store), **kw),
                    model=model, model_id="other", plots=False)  # fmt: skip
    assert recorded == [2, 1, 2, 1, 2, 1]


def test_fidelity_dense_and_streamingllm(model):
    prompts = [[(7 * i + 3) % 256 for i in range(200)], [(5 * i + 1) % 256 for i in range(180)]]
    recs = fidelity(model, prompts, ["dense", "streamingllm"], [0.1], steps=8)
    dense, stream = recs
    assert (dense["method"], dense["budget"]) == ("dense", None)
    assert dense["top1_agreement"] == 1.0 and dense["kl_mean"] == 0.0 and dense["kl_max"] == 0.0
    assert stream["top1_agreement"] < 1.0 or stream["kl_mean"] > 0.0
    assert stream["kept_fraction"] < 0.2 and stream["steps"] == 8 and stream["n"] == 2
    assert len(stream["kl_per_step"]) == 8


def test_cli_eval_every_method_fidelity_and_report(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", ckpt, "--suite", "passkey", "--lengths", "128", "--budgets", "0.3"]
    argv += ["--n", "2", "--out", str(out), "--mode", "question-in-prompt", "--no-progress"]
    argv += ["--param", "snapkv.window=4", "--param", "pyramidkv.window=4", "--param", "h2o_window.window=4"]
    # a random checkpoint has no shipped calibration or gates
    argv += ["--param", "razorattention.heads=[[0, 0]]", "--param", "trimkv.gates=constant"]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    names = [m.name for m in mpckv.list_methods()]
    assert sorted(r["method"] for r in records) == sorted(names)  # every registered method runs
    assert all(r["mode"] == "question-in-prompt" for r in records)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runs"][-1]["command"].startswith("mpckv eval --model")

    fid = tmp_path / "fid.json"
    argv = ["fidelity", "--model", ckpt, "--methods", "dense,streamingllm", "--budgets", "0.2"]
    argv += ["--synthetic", "passkey", "--length", "160", "--steps", "4", "--out", str(fid)]
    assert main(argv) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert [r["method"] for r in json.loads(fid.read_text())["records"]] == ["dense", "streamingllm"]

    page = tmp_path / "docs" / "RESULTS.md"
    assert main(["report", "--results", str(out), "--out", str(page), "--fidelity", str(fid)]) == 0
    text = page.read_text()
    assert "mpckv report --results" in text and "mpckv eval --model" in text
    assert all(f"`{name}`" in text for name in names)
    assert "## passkey" in text and "## Fidelity against dense" in text
    img = tmp_path / "docs" / "img" / "run_passkey.png"
    assert img.is_file() and "](img/run_passkey.png)" in text

    # notes under the title; bench tables name each method's parameters
    notes = tmp_path / "notes.md"
    notes.write_text("## How the benchmarks were run\n\n`mpckv bench secure ...`\n")
    rec = dict(phase="decode", length=64, parties=2, protocol="beaver", rounds_per_token=10.0)
    rec |= dict(lan_s_per_token=1.0, wan_s_per_token=2.0, wall_s_per_token=0.5, online_bytes_per_token=0.0)
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            [
                dict(rec, method="dense", kv_cache="stock", bytes_per_token=4096.0, params={}),
                dict(
                    rec,
                    method="mpcache",
                    kv_cache="persistent",
                    bytes_per_token=1024.0,
                    params={"budget": 0.1},
                ),
            ]
        )
    )
    argv = ["report", "--results", str(out), "--out", str(page), "--bench", str(bench), "--notes", str(notes)]
    assert main(argv) == 0
    text = page.read_text()
    assert text.index("## How the benchmarks were run") < text.index("## Methods")
    assert '`mpcache` {"budget": 0.1}' in text and "4.00×" in text and "--notes" in text


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--suite", "passkey,bogus"], "unknown suite"),
        (["--methods", "dense,nosuchmethod"], "unknown method"),
        (["--lengths", "256,abc"], "--lengths"),
        (["--lengths", "32"], ">= 64"),
        (["--lengths", ""], "must not be empty"),
        (["--budgets", "2.5"], "budget"),
        (["--param", "quest.window=3", "--methods", "snapkv"], "not in --methods"),
        (["--param", "snapkv.nonsense=3", "--methods", "snapkv"], "nonsense"),
        (["--param", "window=3"], "method.key=value"),
        (["--n", "0"], "--n"),
    ],
)
def test_cli_eval_errors(ckpt, tmp_path, capsys, extra, needle):
    code = main(["eval", "--model", ckpt, "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpckv: error:") and needle in lines[0], err
    assert not (tmp_path / "x").exists()


def test_cli_other_errors(ckpt, tmp_path, capsys):
    cases = [
        ["eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--lengths", "128"],
        ["fidelity", "--model", ckpt, "--synthetic", "bogus"],
        ["fidelity", "--model", ckpt, "--methods", "nope", "--synthetic", "passkey"],
        ["report", "--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "R.md")],
        ["report", "--results", str(tmp_path), "--notes", str(tmp_path / "no-notes.md")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mpckv: error:"), (argv, lines)


def test_parsers():
    assert parse_budgets("0.05, 1.0,64, 1") == [0.05, 1.0, 64, 1]  # "1" is one token (mpckv.budget)
    assert parse_method_params(["snapkv.window=16", "quest.pooling=max"]) == {
        "snapkv": {"window": 16},
        "quest": {"pooling": "max"},
    }
    cfg = EvalConfig(model="unused", out="unused", suites="passkey,ppl", lengths="128,256", methods="all")
    cells = cfg.cells()
    dense = [c for c in cells if c.method == "dense"]
    assert len(dense) == 4 and all(c.budget is None for c in dense)  # once per (suite, length)
    others = len(mpckv.list_methods()) - 1
    assert len(cells) == 4 * (1 + others * len(cfg.budgets))
    assert cfg.key(cells[0], "m") != cfg.key(cells[1], "m")


def test_cli_eval_default_out_dir(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", ckpt, "--suite", "passkey", "--lengths", "128", "--methods", "dense"]
    assert main([*argv, "--n", "1", "--no-progress", "--no-plots"]) == 0
    records = json.loads((tmp_path / "eval-runs" / Path(ckpt).name / "results.json").read_text())
    assert [r["method"] for r in records] == ["dense"] and records[0]["metric"] == "first_line"


def test_suite_table_keeps_rows_with_different_parameters_apart():
    from mpckv.evals.report import suite_table

    base = {"suite": "passkey", "length": 64, "budget": 0.1, "mode": "query-agnostic", "model": "m", "n": 2}
    base.update(kept_fraction=0.1, read_fraction=0.1)
    recs = [
        dict(base, method="nosa", params={}, accuracy=1.0),
        dict(base, method="nosa", params={"bias": "zero"}, accuracy=0.5),
    ]
    table = suite_table(recs, "passkey")
    rows = [line for line in table.splitlines() if line.startswith("| `nosa`")]
    assert len(rows) == 2
    assert "(bias=zero)" in rows[1] and "(bias=zero)" not in rows[0]
