"""The ``mpckv`` command line: ``main([...])`` in-process, plus one subprocess run of ``python -m mpckv``."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from mpckv.cli import build_parser, main, parse_params

STATS_KEYS = {
    "read_per_layer": list,
    "kept_fraction": float,
    "live_cache_bytes": int,
    "peak_cache_bytes": int,
    "dense_cache_bytes": int,
    "prompt_lengths": list,
    "new_tokens": list,
}
REQUIRED = {
    "tokens": list,
    "text": str,
    "method": str,
    "kept_per_layer": list,
    "cache_bytes": int,
    "prefill_s": float,
    "decode_s": float,
    **STATS_KEYS,
}
PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def gen_json(capsys, ckpt, *extra):
    code, out, err = run(capsys, "generate", "--model", ckpt, "--prompt", PROMPT, "--json", *extra)
    assert code == 0, err
    return json.loads(out), out


def assert_one_line_error(code, out, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mpckv: error:"), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------- methods
def test_methods_table(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["name", "family", "paper", "secure"]
    names = {line.split()[0] for line in lines[1:]}
    assert {"dense", "streamingllm"} <= names


def test_methods_json(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    assert {"dense", "streamingllm"} <= set(by_name)
    assert set(by_name["streamingllm"]) == {"name", "family", "paper", "secure", "summary", "secure_note"}
    assert by_name["streamingllm"]["family"] == "eviction"
    # every method without a secure path says why in one line
    for row in rows:
        if row["secure"] != "yes":
            assert row["secure_note"] and "\n" not in row["secure_note"], row["name"]


def test_python_m_mpckv_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "mpckv", "methods", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "dense" in {r["name"] for r in json.loads(proc.stdout)}


def test_console_script_points_to_main():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "mpckv"]
    assert ep.value == "mpckv.cli:main"
    assert ep.load() is main


# --------------------------------------------------------------------------------------------- generate
def test_generate_json_keys_and_types(capsys, ckpt):
    data, _ = gen_json(capsys, ckpt, "--max-new-tokens", "6", "--ignore-eos")
    for key, typ in REQUIRED.items():
        assert isinstance(data[key], typ), (key, data[key])
    assert data["method"] == "dense"
    assert data["budget"] is None
    assert len(data["tokens"]) == 6
    assert all(isinstance(t, int) and 0 <= t < 300 for t in data["tokens"])
    assert len(data["kept_per_layer"]) == len(data["read_per_layer"]) == 3
    assert data["new_tokens"] == [6]
    assert data["prompt_lengths"] == [len(PROMPT.encode())]
    assert data["kept_fraction"] == pytest.approx(1.0)
    assert data["finished"] is False


def test_generate_respects_eos_by_default(capsys, ckpt):
    data, _ = gen_json(capsys, ckpt, "--max-new-tokens", "5")
    assert len(data["tokens"]) <= 5
    assert data["new_tokens"] == [len(data["tokens"])]
    assert 2 not in data["tokens"]  # eos_token_id of the random LlamaConfig


def test_out_writes_identical_json(capsys, ckpt, tmp_path):
    out_file = tmp_path / "sub" / "result.json"
    _, stdout = gen_json(capsys, ckpt, "--max-new-tokens", "3", "--out", str(out_file))
    assert out_file.read_text(encoding="utf-8") == stdout


def test_human_output_and_out(capsys, ckpt, tmp_path):
    out_file = tmp_path / "r.json"
    code, out, err = run(
        capsys, "generate", "--model", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4",
        "--ignore-eos", "--out", str(out_file), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out_file.read_text())
    assert out == data["text"] + "\n"
    assert "[dense budget=-]" in err and "4 new tok" in err and "live" in err


def test_dense_vs_streamingllm(capsys, ckpt, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    common = ["generate", "--model", ckpt, "--prompt-file", str(prompt_file), "--json", "--ignore-eos"]
    code, out, err = run(capsys, *common, "--max-new-tokens", "4")
    assert code == 0, err
    dense = json.loads(out)
    code, out, err = run(
        capsys, *common, "--max-new-tokens", "4", "--method", "streamingllm", "--budget", "16",
        "--param", "sinks=2",
    )  # fmt: skip
    assert code == 0, err
    sl = json.loads(out)
    assert sl["method"] == "streamingllm" and sl["budget"] == 16
    assert max(sl["kept_per_layer"]) <= 16 < min(dense["kept_per_layer"])
    assert sl["cache_bytes"] < dense["cache_bytes"]
    assert sl["dense_cache_bytes"] == dense["dense_cache_bytes"]
    assert len(sl["tokens"]) == 4
    # ratio and per-layer budgets parse too
    code, out, err = run(
        capsys, *common, "--max-new-tokens", "2", "--method", "streamingllm", "--budget", "0.5"
    )
    assert code == 0, err
    assert json.loads(out)["budget"] == 0.5
    code, out, err = run(
        capsys, *common, "--max-new-tokens", "2", "--method", "snapkv", "--budget", "[8, 8, 8]"
    )
    assert code == 0, err
    assert json.loads(out)["budget"] == [8, 8, 8]


def test_seeded_sampling_is_reproducible(capsys, ckpt):
    args = [
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
    ]
    a, _ = gen_json(capsys, ckpt, *args, "--seed", "7")
    b, _ = gen_json(capsys, ckpt, *args, "--seed", "7")
    assert a["tokens"] == b["tokens"]


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "nosuchmethod"], "unknown method"),
        (["--method", "dense+nosuchmethod"], "unknown method"),
        (["--budget", "1.5"], "(0, 1]"),
        (["--budget", "-3"], ">= 1"),
        (["--budget", "0"], ">= 1"),
        (["--budget", "abc"], "cannot parse budget"),
        (["--budget", "[]"], "empty"),
        (["--method", "snapkv", "--budget", "[0.5, 0.5]"], "3 layers"),
        (["--budget", "0.5"], "--budget has no effect with --method dense"),
        (["--method", "streamingllm", "--param", "window"], "key=value"),
        (["--method", "streamingllm", "--param", "=3"], "key=value"),
        (["--method", "streamingllm", "--param", "nosuch=1"], "no parameter"),
        (["--method", "streamingllm", "--param", "window=0"], "window must be an integer >= 1, got 0"),
        (["--param", "budget=0.1"], "--budget"),
        (["--method", "streamingllm", "--param", "sinks=1", "--param", "sinks=2"], "more than once"),
        (["--max-new-tokens", "-1"], ">= 0"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--dtype", "int8"], "invalid choice"),
        (["--device", "tpu"], "invalid device"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, ckpt, extra, needle):
    code, out, err = run(
        capsys, "generate", "--model", ckpt, "--prompt", "hi", "--max-new-tokens", "1", *extra
    )
    line = assert_one_line_error(code, out, err)
    assert needle in line
    assert out == ""


def test_missing_model_dir(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert "does not exist" in assert_one_line_error(code, out, err)


def test_missing_prompt_file(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "generate", "--model", ckpt, "--prompt-file", str(tmp_path / "none.txt"))
    assert "prompt file" in assert_one_line_error(code, out, err)


def test_no_prompt_and_both_prompts(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "generate", "--model", ckpt)
    assert "--prompt" in assert_one_line_error(code, out, err)
    f = tmp_path / "p.txt"
    f.write_text("hi")
    code, out, err = run(capsys, "generate", "--model", ckpt, "--prompt", "hi", "--prompt-file", str(f))
    assert "not allowed" in assert_one_line_error(code, out, err)


def test_empty_prompt(capsys, ckpt):
    code, out, err = run(capsys, "generate", "--model", ckpt, "--prompt", "")
    assert "at least one token" in assert_one_line_error(code, out, err)


def test_usage_errors(capsys):
    assert_one_line_error(*run(capsys))
    assert_one_line_error(*run(capsys, "nosuchcommand"))
    assert_one_line_error(*run(capsys, "generate", "--prompt", "hi"))  # --model missing
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "generate" in out


def test_parse_params():
    assert parse_params(["window=16", "pooling=avg", "x=[1, 2]", "f=0.5", 's="q"']) == {
        "window": 16,
        "pooling": "avg",
        "x": [1, 2],
        "f": 0.5,
        "s": "q",
    }
    assert parse_params(["a=b=c"]) == {"a": "b=c"}
    assert {a.dest for a in build_parser()._actions} >= {"command"}
