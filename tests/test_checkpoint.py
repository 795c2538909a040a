"""Loading checkpoints: round trip, sharded files, clear errors for malformed input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mpckv
from mpckv import CheckpointError, ConfigError


def test_save_load_roundtrip(tiny_random_model, tmp_path):
    mpckv.save_model(tiny_random_model, tmp_path / "m")
    again = mpckv.load_model(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again(ids), tiny_random_model(ids))


def test_sharded(checkpoint_factory, tmp_path):
    path, hf = checkpoint_factory("llama")
    hf.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(mpckv.load_model(tmp_path / "sh")(ids), mpckv.load_model(path)(ids))


def _copy(path, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(path, dst)
    return dst


def test_errors(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory("llama")
    with pytest.raises(CheckpointError, match="does not exist"):
        mpckv.load_model(tmp_path / "missing")
    d = _copy(path, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        mpckv.load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mpckv.load_model(d)
    bad = {**cfg}
    del bad["hidden_size"]
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="hidden_size"):
        mpckv.load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="multiple"):
        mpckv.load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="shape"):
        mpckv.load_model(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        mpckv.load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        mpckv.load_model(d)
    with pytest.raises(CheckpointError, match="dtype"):
        mpckv.load_model(path, dtype="int3")


def test_layer_count_mismatch_is_reported(checkpoint_factory, tmp_path):
    """Hardening case 11: a config with fewer or more layers than the stored tensors must not load."""
    path, _ = checkpoint_factory("llama")
    d = _copy(path, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n - 1}))
    with pytest.raises(
        CheckpointError, match=rf"has 9 tensor\(s\) the config does not use \(model\.layers\.{n - 1}\."
    ):
        mpckv.load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n + 1}))
    with pytest.raises(
        CheckpointError, match=rf"lacks 9 tensor\(s\) the config needs \(model\.layers\.{n}\."
    ):
        mpckv.load_model(d)
    (d / "config.json").write_text(json.dumps(cfg))
    assert mpckv.load_model(d).config.num_hidden_layers == n
