"""``mpckv launch -- generate --secure`` and ``mpckv bench secure`` end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mpckv
from mpckv.cli import main
from mpckv.random_model import random_llama, small_config

pytestmark = pytest.mark.mpc


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte_model")
    mpckv.save_model(random_llama(small_config()), path)
    return str(path)


def _mpckv(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mpckv", *args], capture_output=True, text=True, timeout=timeout
    )


def test_launch_secure_generate_json(byte_model, tmp_path):
    out = tmp_path / "r.json"
    proc = _mpckv(
        "launch",
        "--parties",
        "2",
        "--",
        "generate",
        "--secure",
        "--model",
        byte_model,
        "--prompt",
        "Hello MPC",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1]" in proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    plain = mpckv.Engine(mpckv.load_model(byte_model)).generate([list(b"Hello MPC")], 3, stop_tokens=[])
    assert got["tokens"] == plain.tokens[0]
    for key in (
        "tokens",
        "text",
        "method",
        "budget",
        "kept_per_layer",
        "cache_bytes",
        "prefill_s",
        "decode_s",
    ):
        assert key in got
    c = got["comm"]
    assert (
        c["bytes_total"] > 0
        and c["rounds"] > 0
        and c["online_bytes"] + c["offline_bytes"] == c["bytes_total"]
    )
    assert {"prefill", "decode"} <= set(c["by_phase"])
    assert c["modelled"]["wan_s"] > c["modelled"]["lan_s"] > 0


def test_secure_generate_outside_launcher_is_a_clear_error(byte_model, capsys):
    code = main(["generate", "--secure", "--model", byte_model, "--prompt", "x", "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mpckv launch" in err[0]


def test_bench_secure_records(byte_model, tmp_path):
    out = tmp_path / "b.json"
    proc = _mpckv(
        "bench",
        "secure",
        "--model",
        byte_model,
        "--methods",
        "dense,streamingllm",
        "--lengths",
        "16,48",
        "--steps",
        "1",
        "--budget",
        "0.25",
        "--param",
        "streamingllm.sinks=2",
        "--kv-cache",
        "stock,persistent",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    recs = [r for r in rows if r["phase"] == "decode"]
    assert len(recs) == 8
    # streamingllm's prefill cut is by public index: measured, and local (no traffic, no rounds)
    cuts = [r for r in rows if r["phase"] == "prefill_eviction"]
    assert len(cuts) == 4 and {r["method"] for r in cuts} == {"streamingllm"}
    assert all(r["bytes"] == 0 and r["rounds"] == 0 for r in cuts)
    for r in recs:
        for key in (
            "method",
            "length",
            "parties",
            "bytes_per_token",
            "rounds_per_token",
            "lan_s_per_token",
            "wan_s_per_token",
            "wall_s_per_token",
            "kv_cache",
        ):
            assert key in r
    by = {(r["method"], r["length"]): r for r in recs if r["kv_cache"] == "stock"}
    pers = {(r["method"], r["length"]): r for r in recs if r["kv_cache"] == "persistent"}
    # persistent masks never cost more per token than stock re-masking
    assert pers[("dense", 48)]["bytes_per_token"] < by[("dense", 48)]["bytes_per_token"]
    # dense per-token bytes grow with n; streamingllm at 25 % moves fewer bytes than dense at n = 48
    assert by[("dense", 48)]["bytes_per_token"] > by[("dense", 16)]["bytes_per_token"]
    assert by[("streamingllm", 48)]["bytes_per_token"] < by[("dense", 48)]["bytes_per_token"]
    assert "| dense |" in proc.stdout


def test_bench_rejects_methods_without_secure_support(capsys):
    name = next(m.name for m in mpckv.list_methods() if m.secure != "yes")  # e.g. a "planned" one
    code = main(["bench", "secure", "--methods", name, "--lengths", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not run under MPC" in err[0] and name in err[0]


def test_bench_secure_prefill_evicting_methods(tmp_path):
    """SnapKV and H2O: a measured secure prefill eviction row, then a decode row over the cache it left."""
    from mpckv.protocols.bench_secure import EVICTION_TOTALS, RECORD_FIELDS, _ids

    n = 64
    out = tmp_path / "e.json"
    proc = _mpckv(
        "bench",
        "secure",
        "--model",
        "tiny",
        "--methods",
        "dense,snapkv,h2o",
        "--lengths",
        str(n),
        "--steps",
        "1",
        "--budget",
        "0.25",
        "--param",
        "snapkv.window=4",
        "--kv-cache",
        "stock",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {(r["method"], r["phase"]): r for r in json.loads(out.read_text())}
    assert set(recs) == {
        ("dense", "decode"),
        ("snapkv", "prefill_eviction"),
        ("snapkv", "decode"),
        ("h2o", "prefill_eviction"),
        ("h2o", "decode"),
    }
    model = mpckv.load_model("tiny")
    ids = _ids(model.config, n, seed=n)  # the bench's public random prompt at length n
    for name, params in (("snapkv", {"window": 4}), ("h2o", {})):
        ev, dec = recs[(name, "prefill_eviction")], recs[(name, "decode")]
        for key in (*RECORD_FIELDS, *EVICTION_TOTALS, "kept_per_layer", "cache_source"):
            assert key in ev, (name, key)
        assert dec["prefill_eviction"] == "secure" and dec["kept_per_layer"] == ev["kept_per_layer"]
        # the secure eviction really ran: secret votes / scores and a secure top-k cost traffic and rounds
        assert ev["bytes"] > 0 and ev["rounds"] > 0 and ev["bytes"] == ev["bytes_per_token"]
        assert ev["wan_s"] > ev["lan_s"] > 0
        # it kept exactly as many entries per layer as the plaintext method does on the same prompt
        plain = mpckv.Engine(model, name, budget=0.25, **params).prefill([ids])
        assert ev["kept_per_layer"] == [int(c.lengths.max()) for c in plain.cache]
        assert max(ev["kept_per_layer"]) < n
        # decoding over the compacted secret cache moves fewer bytes than dense over n entries
        assert dec["bytes_per_token"] < recs[("dense", "decode")]["bytes_per_token"]
    assert recs[("dense", "decode")]["prefill_eviction"] == "none"
    assert "| snapkv | stock | prefill_eviction |" in proc.stdout


def test_bench_secure_refused_setting_is_one_line(tmp_path):
    """A method whose secure code refuses its setting stops the bench with one line naming it."""
    out = tmp_path / "x.json"
    proc = _mpckv(
        "bench",
        "secure",
        "--model",
        "tiny",
        "--methods",
        "h2o",
        "--lengths",
        "16",
        "--steps",
        "1",
        "--param",
        "h2o.normalize=true",
        "--kv-cache",
        "stock",
        "--json",
        str(out),
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mpckv: error: bench secure: h2o cannot be benched") and "normalize" in last
    assert "Traceback" not in proc.stderr
