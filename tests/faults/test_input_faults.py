"""Bad input through the CLI and the API (issue 16, cases 1-11, 15-16): one line, the right status.

These run the CLI in-process (``mpckv.cli.main``) so that they take milliseconds, except where the fault
needs a real process (bytes on stdin).
"""

from __future__ import annotations

import errno
import io
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from faults.helpers import assert_one_line_error, mpckv
from mpckv.cli import main
from mpckv.errors import ConfigError, MpckvError, ShapeError

pytestmark = pytest.mark.faults

GEN = ["generate", "--model", "tiny", "--prompt", "Hi", "--max-new-tokens", "2", "--no-progress"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(code: int, err: str, expected: int, *needles: str) -> str:
    last = assert_one_line_error(code, err, expected, *needles)
    assert len(err.strip().splitlines()) == 1, err
    return last


# ------------------------------------------------------------------------- case 1: secure support
@pytest.mark.parametrize("method", ["keyformer", "a2ats", "think", "streamingllm+kvmerger"])
@pytest.mark.parametrize("entry", ["generate", "launch", "party"])
def test_secure_generate_refuses_methods_without_secure_support(entry, method, capsys):
    secure = ["generate", "--secure", "--model", "tiny", "--prompt", "Hi", "--method", method]
    argv = {
        "generate": secure,
        "launch": ["launch", "--parties", "2", "--", *secure],
        "party": [
            "party",
            "--rank",
            "0",
            "--world-size",
            "2",
            "--rendezvous",
            "tcp://127.0.0.1:1",
            "--",
            *secure,
        ],
    }[entry]
    start = time.monotonic()
    code, out, err = run(argv, capsys)
    bad = method.split("+")[-1]  # a composition names its part that has no secure path
    one_line(code, err, 2, f"method {bad!r}", "does not run under MPC")
    assert time.monotonic() - start < 10  # no party was started
    assert out == ""


# ------------------------------------------------------------------------ case 2: output files
def test_out_directory_is_refused_before_the_run(tmp_path, capsys):
    code, out, err = run([*GEN, "--out", str(tmp_path)], capsys)
    one_line(code, err, 2, "is a directory")
    assert out == ""  # nothing was generated


def test_secure_out_directory_is_refused_before_any_party_starts(tmp_path, capsys):
    argv = ["launch", "--parties", "2", "--", "generate", "--secure", "--model", "tiny", "--prompt", "Hi"]
    code, _, err = run([*argv, "--out", str(tmp_path)], capsys)
    one_line(code, err, 2, "is a directory")


def test_bench_json_directory_is_refused_up_front(tmp_path, capsys):
    code, _, err = run(["bench", "secure", "--lengths", "16", "--json", str(tmp_path)], capsys)
    one_line(code, err, 2, "--json", "is a directory")


def test_out_parent_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run([*GEN, "--out", str(tmp_path / "file" / "sub" / "r.json")], capsys)
    one_line(code, err, 2, "cannot create the directory")


def test_full_disk_leaves_no_half_written_file(tmp_path, capsys, monkeypatch):
    import mpckv.io

    target = tmp_path / "r.json"
    target.write_text('{"old": true}\n')

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mpckv.io.os, "fsync", no_space)
    code, _, err = run([*GEN, "--out", str(target)], capsys)
    one_line(code, err, 2, "No space left on device")
    assert json.loads(target.read_text()) == {"old": True}  # the previous result is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left


def test_out_is_written_atomically_and_completely(tmp_path, capsys):
    target = tmp_path / "deep" / "r.json"
    code, _, _ = run([*GEN, "--out", str(target)], capsys)
    assert code == 0
    payload = json.loads(target.read_text())
    assert payload["method"] == "dense" and len(payload["tokens"]) <= 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]


# ------------------------------------------------------------------- cases 3-5: hyper-parameters
@pytest.mark.parametrize(
    ("method", "param", "needle"),
    [
        ("snapkv", "window=2.5", "method 'snapkv': window must be an integer >= 1, got 2.5"),
        ("snapkv", "window=abc", "method 'snapkv': window must be an integer >= 1, got 'abc'"),
        ("snapkv", "kernel_size=true", "method 'snapkv': kernel_size must be an integer >= 1, got true"),
        ("h2o_window", "window=[1]", "method 'h2o_window': window must be an integer >= 1, got [1]"),
        ("pyramidkv", "kernel_size=x", "method 'pyramidkv': kernel_size must be an integer"),
        ("streamingllm", "sinks=abc", "method 'streamingllm': sinks must be an integer >= 0, got 'abc'"),
        ("streamingllm", "window=2.5", "method 'streamingllm': window must be an integer >= 1, got 2.5"),
        ("streamingllm", "window=true", "method 'streamingllm': window must be an integer >= 1, got true"),
        ("h2o", "normalize=abc", "method 'h2o': normalize must be true or false, got 'abc'"),
        ("quest", "group_reduce=median", "method 'quest': group_reduce must be one of 'max', 'mean', 'sum'"),
        ("streamingllm+quest", "page_size=0.5", "method 'quest': page_size must be an integer"),
    ],
)
def test_wrong_parameter_types_are_one_line_errors(method, param, needle, capsys):
    code, _, err = run([*GEN, "--method", method, "--param", param], capsys)
    one_line(code, err, 2, needle)


@pytest.mark.parametrize(
    "meta", ["name", "family", "paper", "secure", "default_budget", "needs_decode_probs"]
)
def test_class_metadata_is_not_a_parameter(meta, capsys):
    code, _, err = run([*GEN, "--method", "snapkv", "--param", f"{meta}=foo"], capsys)
    last = one_line(code, err, 2, f"method 'snapkv' has no parameter(s) ['{meta}']")
    taken = last.split("it takes ")[1]
    assert "window" in taken and "kernel_size" in taken
    for word in ("'name'", "'family'", "'paper'", "'secure'", "'default_budget'"):
        assert word not in taken


def test_engine_keyword_name_is_a_config_error():
    from mpckv import Engine, get_method, random_model
    from mpckv.random_model import small_config

    with pytest.raises(ConfigError, match="has no parameter"):
        get_method("snapkv", name="foo")
    with pytest.raises(ConfigError, match="has no parameter"):
        Engine(random_model.random_llama(small_config()), "snapkv", name="foo")


# --------------------------------------------------------------------------- cases 6-7: budgets
def test_budget_one_means_one_token_in_generate_and_eval(capsys):
    from mpckv.evals.config import parse_budgets

    assert parse_budgets("1") == [1] and isinstance(parse_budgets("1")[0], int)
    assert parse_budgets("1.0,100%") == [1.0, 1.0] and all(isinstance(b, float) for b in parse_budgets("1.0"))
    code, out, _ = run([*GEN, "--method", "streamingllm", "--budget", "1", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["budget"] == 1


@pytest.mark.parametrize("bad", ["abc", "2.5", "0", "-1", "256.0", "nan"])
def test_generate_and_eval_reject_budgets_with_the_same_message(bad, capsys, tmp_path):
    code_g, _, err_g = run([*GEN, "--method", "snapkv", "--budget", bad], capsys)
    code_e, _, err_e = run(
        ["eval", "--model", "tiny", "--methods", "snapkv", "--budgets", bad, "--out", str(tmp_path)], capsys
    )
    one_line(code_g, err_g, 2)
    one_line(code_e, err_e, 2)
    assert err_g == err_e


def test_budget_with_dense_is_refused(capsys):
    code, out, err = run([*GEN, "--method", "dense", "--budget", "4"], capsys)
    one_line(code, err, 2, "--budget has no effect with --method dense")
    assert out == ""


# ----------------------------------------------------------------------- cases 8-9: positions
def test_prompt_past_the_position_limit_is_refused(capsys):
    argv = ["generate", "--model", "tiny", "--prompt", "x" * 5000, "--max-new-tokens", "2"]
    code, out, err = run(argv, capsys)
    one_line(code, err, 2, "needs 5001 positions", "4096 (max_position_embeddings)")
    assert out == ""


def test_absurd_max_new_tokens_is_refused_at_once(capsys):
    start = time.monotonic()
    code, _, err = run([*GEN[:-3], "--max-new-tokens", "100000000"], capsys)
    one_line(code, err, 2, "max_position_embeddings")
    assert time.monotonic() - start < 10
    code, _, err = run([*GEN[:-3], "--max-new-tokens", "1e8"], capsys)
    one_line(code, err, 2, "expected an integer, got '1e8'")


@pytest.mark.parametrize("length", ["8192", "100000000"])
def test_eval_lengths_past_the_positions_are_refused_up_front(length, capsys, tmp_path):
    start = time.monotonic()
    argv = [
        "eval",
        "--model",
        "tiny",
        "--methods",
        "dense",
        "--lengths",
        length,
        "--out",
        str(tmp_path / "e"),
    ]
    code, _, err = run(argv, capsys)
    one_line(code, err, 2, f"--lengths {length} exceed", "4096 positions")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "e" / "results.json").exists()


# --------------------------------------------------------------------------------- case 10: stdin
@pytest.mark.slow
def test_non_utf8_stdin_is_the_same_clean_error_as_a_file(tmp_path):
    bad = b"\xff\xfe not utf-8"
    proc = mpckv("generate", "--model", "tiny", "--prompt-file", "-", stdin=bad, timeout=120)
    last = assert_one_line_error(proc.returncode, proc.stderr, 2, "cannot read the prompt from stdin")
    (tmp_path / "p.txt").write_bytes(bad)
    proc_f = mpckv("generate", "--model", "tiny", "--prompt-file", str(tmp_path / "p.txt"), timeout=120)
    last_f = assert_one_line_error(proc_f.returncode, proc_f.stderr, 2, "cannot read prompt file")
    assert last.split(": ", 3)[-1] == last_f.split(": ", 3)[-1]  # the same decoding error


def test_non_utf8_stdin_in_process(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xc3\x28"), encoding="utf-8"))
    code, _, err = run(["generate", "--model", "tiny", "--prompt-file", "-"], capsys)
    one_line(code, err, 2, "cannot read the prompt from stdin", "invalid continuation byte")


# --------------------------------------------------------------------- case 11: broken checkpoint
def test_truncated_checkpoint_is_one_line(tmp_path, capsys, small_ckpt):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(["generate", "--model", str(ckpt), "--prompt", "Hi"], capsys)
    one_line(code, err, 2)


# ----------------------------------------------------------------------- cases 15-16: the API
@pytest.fixture(scope="module")
def engine():
    import dataclasses

    from mpckv import Engine
    from mpckv.random_model import random_llama, small_config

    config = dataclasses.replace(small_config(), max_position_embeddings=64)  # short, so limits are cheap
    return Engine(random_llama(config), "dense")


@pytest.mark.parametrize(
    ("ids", "needle"),
    [
        ([[1.5, 2.7]], "token ids must be integers; prompt 0 contains 1.5"),
        ([1, 2.0], "token ids must be integers"),
        ([[True, 3]], "token ids must be integers; prompt 0 contains True"),
        (torch.tensor([[1.0, 2.0]]), "integer tensor, got dtype torch.float32"),
        ("hello", "not text; encode the prompt first"),
        ([["a", "b"]], "token ids must be integers"),
        (5, "got int"),
    ],
)
def test_api_rejects_non_token_ids(engine, ids, needle):
    with pytest.raises(ShapeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        engine.generate(ids, 2)


@pytest.mark.parametrize("n", [2.5, -1, True, "3"])
def test_api_rejects_bad_max_new_tokens(engine, n):
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 0"):
        engine.generate([[1, 2]], n)


def test_api_refuses_positions_past_the_model(engine):
    limit = engine.model.config.max_position_embeddings
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        engine.generate([[1] * 8], limit)
    assert len(engine.generate([[1] * 8], limit - 7, stop_tokens=[]).tokens[0]) == limit - 7  # just fits


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps", 3.5])
def test_api_rejects_unknown_devices(device):
    from mpckv import load_model

    with pytest.raises(ConfigError, match="device"):
        load_model("tiny", device=device)


@pytest.mark.parametrize(("ids", "n"), [("hello", 2), ([[0.5]], 2), ([[1]], 2.5), ([[1]], 10**9)])
def test_every_api_error_is_an_mpckv_error(engine, ids, n):
    with pytest.raises(MpckvError):
        engine.generate(ids, n)


def test_generate_out_path_unchanged_when_run_fails_early(tmp_path, capsys):
    target = tmp_path / "r.json"
    code, _, err = run([*GEN, "--method", "snapkv", "--param", "window=0", "--out", str(target)], capsys)
    one_line(code, err, 2, "window must be an integer >= 1, got 0")
    assert not target.exists() and list(Path(tmp_path).iterdir()) == []
