"""``mpckv bench fusion`` on a small random checkpoint: records, ratios, hit rate, CLI wiring."""

from __future__ import annotations

import json

import pytest

import mpckv
from mpckv.cli import main
from mpckv.data.synthetic import make_sample
from mpckv.plaintext.fusion.bench import split_docs

from .helpers import make_model


def test_split_docs_round_trip():
    s = make_sample("docqa", 1500, 3, num_docs=5)
    docs = split_docs(s.context)
    assert len(docs) == 5 and "".join(docs) == s.context
    assert all(d.startswith("<doc id=") for d in docs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fusion_bench_model")
    mpckv.save_model(make_model(layers=4), path)
    return path


def test_bench_cli_writes_records(ckpt, tmp_path, capsys):
    out = tmp_path / "fusion.json"
    argv = ["bench", "fusion", "--model", str(ckpt), "--lengths", "400", "--chunks", "2", "--n", "1"]
    assert main([*argv, "--repeats", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    by = {r["method"]: r for r in records}
    assert set(by) == {"full", "concat", "cacheblend", "epic", "a3", "kvshare", "elasticcache", "graphkv"}
    assert by["full"]["ttft_speedup"] == 1.0 and by["full"]["recompute_ratio"] == 1.0
    assert by["concat"]["recompute_ratio"] == 0.0
    for name in ("cacheblend", "a3", "kvshare"):
        assert 0.14 <= by[name]["recompute_ratio"] <= 0.15
        assert by[name]["hit_rate"] == 1.0
    assert by["epic"]["compute_fraction"] < by["cacheblend"]["compute_fraction"]
    assert by["graphkv"]["recompute_ratio"] == pytest.approx(0.5, abs=0.2)  # the target of 2 chunks
    assert by["elasticcache"]["recompute_ratio"] <= 0.15
    assert "cacheblend" in capsys.readouterr().out


def test_bench_agent_and_kvsched_cli(tmp_path, capsys):
    out = tmp_path / "agent.json"
    assert main(["bench", "agent", "--programs", "30", "--json", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())["agent_records"]}
    assert set(rows) == {"lru", "program-fcfs", "continuum"} and rows["lru"]["jct_vs_lru"] == 1.0
    assert rows["continuum"]["pins"] > 0 and rows["lru"]["pins"] == 0
    out2 = tmp_path / "sched.json"
    assert main(["bench", "kvsched", "--requests", "60", "--json", str(out2)]) == 0
    names = [r["scheduler"] for r in json.loads(out2.read_text())["sched_records"]]
    assert names == ["fcfs", "hit-rate", "hit-rate+age"]
    assert "continuum" in capsys.readouterr().out


def test_bench_cli_errors(ckpt, capsys):
    assert main(["bench", "fusion", "--model", str(ckpt), "--recompute", "1.5"]) == 2
    assert "mpckv: error:" in capsys.readouterr().err
