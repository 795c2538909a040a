"""The tiny-model training script (`examples/train_tiny.py`): data rows, mixes, a short run end to end."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from mpckv.checkpoint import load_model
from mpckv.data.synthetic import SEP, training_text

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = mod
    spec.loader.exec_module(mod)
    return mod


def _args(mod, *extra: str):
    """The script's defaults plus ``extra`` flags (``--out`` is required, unused here)."""
    return mod.parse_args(["--out", "unused", *extra])


@pytest.mark.parametrize("frac", [0.45, 0.85])
def test_training_text_context_takes_the_asked_share(frac: float) -> None:
    length = 2048
    text, spans = training_text("kv_retrieval", length, random.Random(3), ctx_frac=frac)
    ctx = text.split(SEP, 1)[0]
    assert abs(len(ctx) - frac * length) <= 0.05 * length
    assert len(text) <= length and spans and all(text[a] == " " for a, _ in spans)


def test_rows_use_the_late_mix_from_its_length_and_vary_the_context_share() -> None:
    mod = _script()
    args = _args(mod, "--mix", "copy:1.0", "--late-mix", "kv_retrieval:1.0@1024", "--ctx-frac", "0.5:0.8")
    batcher = mod.Batcher(args)
    rng = random.Random(0)
    early = bytes(batcher.row(512, rng)[0]).decode()
    assert "|" in early and "Each line below" not in early  # the copy task
    shares = []
    for _ in range(12):
        ids, wts = batcher.row(1024, rng)
        text = bytes(ids).decode()
        assert text.startswith("Each line below")  # kv_retrieval only
        shares.append(len(text.split(SEP, 1)[0]) / 1024)
    assert min(shares) >= 0.45 and max(shares) <= 0.85 and max(shares) - min(shares) > 0.1


@pytest.mark.parametrize("bad", ["0.9:0.5", "0.05:0.5", "0.5:0.99"])
def test_bad_context_share_is_refused(bad: str) -> None:
    mod = _script()
    with pytest.raises(SystemExit, match="ctx-frac"):
        mod.Batcher(_args(mod, "--ctx-frac", bad))


def test_a_short_run_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    mod = _script()
    out = tmp_path / "run"
    common = [
        "--out", str(out), "--threads", "1", "--d-model", "32", "--layers", "2", "--heads", "2",
        "--kv-heads", "1", "--ffn", "64", "--tokens-per-step", "512", "--stages", "128:0.5,256:1.0",
        "--advance-at", "0", "--mix", "copy:0.5,kv_retrieval:0.5", "--late-mix", "passkey:1.0@256",
        "--eval-minutes", "1000", "--eval-n", "1", "--log-every", "2", "--warmup", "2",
    ]  # fmt: skip
    assert mod.main([*common, "--steps", "4"]) == 0
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 4
    first = load_model(out / "model")
    assert mod.main([*common, "--steps", "6", "--resume", str(out)]) == 0
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 6
    second = load_model(out / "model")
    assert not torch.equal(first.embed_tokens, second.embed_tokens)  # it kept training
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["torch_dtype"] == "bfloat16" and exported["mpckv_train_step"] == 6
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_ans" in r for r in logged) and any("final_eval_len" in r for r in logged)
