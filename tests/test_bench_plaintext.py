"""`mpckv bench plaintext`: records, timer parts, ratios, the transformers row and the report section."""

from __future__ import annotations

import json

import pytest

from mpckv.benches.models import load_bench_model, parse_random_spec
from mpckv.benches.plaintext import BenchConfig, format_table, run_bench
from mpckv.cli import main
from mpckv.errors import ConfigError
from mpckv.evals.report import write_report
from mpckv.plaintext.timing import ATTENTION_PARTS, PARTS

SPEC = "random:layers=2,heads=4,kv_heads=2,head_dim=8,hidden=32,ffn=48,vocab=64"


def _cfg(**kw):
    base = dict(model=SPEC, lengths=[48], methods=["streamingllm", "quest"], budgets=[0.25], new_tokens=5,
                warmup=1, threads=1, hf="off")  # fmt: skip
    base["params"] = {"quest": {"page_size": 4, "skip_layers": 0}}
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench():
    return run_bench(_cfg(), progress=False)


def test_records_and_ratios(bench):
    recs = {r["method"]: r for r in bench["records"]}
    assert set(recs) == {"dense", "streamingllm", "quest"} and bench["kind"] == "bench-plaintext"
    assert recs["dense"]["speedup_vs_dense"] == pytest.approx(1.0)
    for r in recs.values():
        assert len(r["decode_steps_ms"]) == 5 and r["decode_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["decode_ms"])
        parts = r["parts_ms"]
        assert set(parts) == set(PARTS)
        assert r["attention_ms"] == pytest.approx(sum(parts[p] for p in ATTENTION_PARTS), abs=1e-3)
        # the parts are inside the step: their medians cannot exceed the slowest step
        assert sum(parts.values()) <= max(r["decode_steps_ms"]) * 1.05 + 0.5
        assert r["speedup_vs_dense"] == pytest.approx(recs["dense"]["decode_ms"] / r["decode_ms"])
    # StreamingLLM holds a quarter of the prompt; Quest keeps the cache but reads less
    assert recs["streamingllm"]["live_cache_bytes"] < recs["dense"]["live_cache_bytes"] / 2
    assert recs["quest"]["live_cache_bytes"] == recs["dense"]["live_cache_bytes"]
    assert recs["quest"]["read_per_step"] < recs["dense"]["read_per_step"] / 2
    assert recs["dense"]["hooks_ms"] <= recs["quest"]["hooks_ms"]
    assert "quest" in format_table(bench)


def test_random_prefill_and_shared_prefill_give_the_same_cache_sizes():
    rnd = run_bench(_cfg(prefill="random", methods=["streamingllm"]), progress=False)
    real = run_bench(_cfg(prefill="real", methods=["streamingllm"]), progress=False)
    for a, b in zip(rnd["records"], real["records"], strict=True):
        assert a["live_cache_bytes"] == b["live_cache_bytes"] and a["prefill_s"] is None
        assert b["prefill_s"] > 0


def test_random_spec_parsing():
    sizes = parse_random_spec("layers=3,heads=8,kv_heads=2")
    assert (sizes["num_hidden_layers"], sizes["num_attention_heads"], sizes["num_key_value_heads"]) == (
        3,
        8,
        2,
    )
    assert sizes["head_dim"] == 128  # defaults: Llama-3-8B attention
    for bad in ("layers=0", "lyrs=2", "heads=x", "heads"):
        with pytest.raises(ConfigError):
            parse_random_spec(bad)
    bm = load_bench_model(SPEC, __import__("torch").float32)
    assert bm.model.config.num_attention_heads == 4 and not bm.has_reference


@pytest.mark.parametrize("bad", [{"new_tokens": 1}, {"warmup": 5}, {"prefill": "x"}, {"budgets": [2.0]}])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        _cfg(**bad).validate()


@pytest.mark.hf
def test_transformers_row():
    pytest.importorskip("transformers")
    res = run_bench(_cfg(methods=[], hf="on"), progress=False)
    recs = {r["method"]: r for r in res["records"]}
    hf = recs["transformers"]
    assert hf["decode_ms"] > 0 and hf["cache_bytes"] > 0
    assert recs["dense"]["vs_hf"] == pytest.approx(recs["dense"]["decode_ms"] / hf["decode_ms"])
    # transformers' cache holds the same K/V as ours after the prefill (fp32, same shapes)
    assert hf["cache_bytes_after_prefill"] == recs["dense"]["live_after_prefill"]


def test_cli_and_report(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "plaintext", "--model", SPEC, "--lengths", "24,40", "--methods", "snapkv",
               "--budgets", "0.5", "--new-tokens", "3", "--warmup", "1", "--threads", "1", "--hf", "off",
               "--json", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0 and "snapkv" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["command"].startswith("mpckv bench plaintext") and len(data["records"]) == 4
    page = write_report([], tmp_path / "docs" / "RESULTS.md", bench=[out])
    text = page.read_text()
    assert "Plaintext decoding speed" in text and "### n = 40" in text and "| snapkv 0.5 |" in text
    assert (tmp_path / "docs" / "img" / "bench_plaintext_b.png").is_file()
