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
    recs = json.loads(out.read_text())
    assert len(recs) == 8
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
    code = main(["bench", "secure", "--methods", "razorattention", "--lengths", "16"])
    assert code == 2 and "does not run under MPC" in capsys.readouterr().err
