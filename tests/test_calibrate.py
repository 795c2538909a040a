"""Offline calibration: RazorAttention head identification (``mpckv calibrate razorattention``)."""

from __future__ import annotations

import json

import pytest
import torch

import mpckv
from mpckv.calibrate import CALIBRATION_DIR, config_signature
from mpckv.calibrate.razor import (
    RazorCalibration,
    calibration_input,
    expected_count,
    head_scores,
    offset_scores,
    select_heads,
)
from mpckv.cli import main
from mpckv.errors import ConfigError
from mpckv.random_model import random_llama, small_config


def _one_hot_pattern(t, d, target_shift, c=30.0):
    """Queries/keys whose logits peak at key ``i - target_shift`` (position codes, no RoPE)."""
    eye = torch.eye(d)[:t]
    q = eye * c
    k = torch.zeros(t, d)
    for j in range(t):
        if j + target_shift < t:
            k[j] = eye[j + target_shift] * c  # key j matches query j + shift
    return q, k


def test_offset_scores_on_hand_built_induction_and_echo_heads():
    seg, reps = 8, 4
    t = 1 + seg * reps
    d = t
    qi, ki = _one_hot_pattern(t, d, seg - 1)  # attends to i - seg + 1: induction
    qe, ke = _one_hot_pattern(t, d, seg)  # attends to i - seg: echo
    noise = torch.Generator().manual_seed(0)
    qr = torch.randn(t, d, generator=noise) * 0.1
    # 4 query heads, 2 KV heads: KV head 0 has the induction query head (index 1), KV head 1 the echo one
    q = torch.stack([qr, qi, qe, qr])
    k = torch.stack([ki, ke])
    ind, echo = offset_scores(q, k, 1.0, seg)
    assert ind[0] > 0.99 and echo[1] > 0.99  # GQA: the maximum over the group's query heads
    assert echo[0] < 0.2 and ind[1] < 0.2  # near-uniform attention (about 1/i)


def _planted_echo_model(layer=0, q_head=2, kv_head=1, c=4.0):
    cfg = small_config(vocab_size=256, hidden_size=32, num_hidden_layers=2, head_dim=8)
    model = random_llama(cfg, seed=3)
    model.inv_freq = torch.zeros_like(model.inv_freq)  # no rotation: content matching stays exact
    lw = model.layers[layer]
    d = cfg.head_dim
    proj = torch.randn(d, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    lw.q_proj[q_head * d : (q_head + 1) * d] = proj * c
    lw.k_proj[kv_head * d : (kv_head + 1) * d] = proj * c
    return model


def test_calibration_finds_a_planted_echo_head():
    model = _planted_echo_model()
    cal = RazorCalibration(seg_len=32, repeats=4, num_sequences=2, low=0, high=256)
    ind, echo = head_scores(model, cal)
    assert ind.shape == echo.shape == (2, 2)
    assert torch.argmax(echo.flatten()).item() == 0 * 2 + 1
    assert float(echo[0, 1]) > 5 * float(echo.flatten()[[0, 2, 3]].max())
    heads = select_heads(ind, echo, 0.0, 0.25)
    assert heads == [[0, 1]]


def test_select_heads_counts_and_union():
    ind = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 0.3]])
    echo = torch.tensor([[0.0, 0.7], [0.1, 0.0], [0.2, 0.0]])
    assert select_heads(ind, echo, 2 / 6, 1 / 6) == [[0, 0], [0, 1], [1, 1]]
    assert select_heads(ind, echo, 2 / 6, 0.0) == [[0, 0], [1, 1]]
    assert expected_count(0.14, 48) == 7 and expected_count(0.01, 8) == 1 and expected_count(0.0, 8) == 0
    # ties go to the lower (layer, head)
    assert select_heads(torch.ones(2, 2), torch.zeros(2, 2), 0.25, 0.0) == [[0, 0]]


def test_calibration_input_is_seeded_and_repeated():
    cal = RazorCalibration(seg_len=16, repeats=3)
    a, b = calibration_input(256, cal, 0, None), calibration_input(256, cal, 0, None)
    assert torch.equal(a, b) and a.shape == (1 + 48,)
    assert torch.equal(a[1:17], a[17:33]) and torch.equal(a[1:17], a[33:49])
    assert int(a[1:].min()) >= 97 and int(a[1:].max()) <= 122  # byte vocabulary: letters
    assert not torch.equal(a, calibration_input(256, cal, 1, None))
    with pytest.raises(ConfigError):
        RazorCalibration(seg_len=1)
    with pytest.raises(ConfigError):
        RazorCalibration(low=10, high=5).token_range(256)


def test_cli_reproduces_the_shipped_tiny_calibration(tmp_path, capsys):
    out = tmp_path / "heads.json"
    assert main(["calibrate", "razorattention", "--model", "tiny", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"] == config_signature(mpckv.load_model("tiny").config)
    shipped = sorted(CALIBRATION_DIR.glob("razorattention_tiny-*.json"))
    assert len(shipped) == 1
    assert json.loads(shipped[0].read_text())["retrieval_heads"] == record["retrieval_heads"]
    # the tiny model's copy task gives it clear induction heads in layer 1
    assert max(record["induction"][1]) > 0.2
    assert "retrieval_heads" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(CALIBRATION_DIR.glob("razorattention_*.json")), ids=lambda p: p.stem)
def test_shipped_calibrations_are_consistent(path):
    from mpckv.config import ModelConfig
    from mpckv.plaintext.methods.razorattention import RazorAttention

    record = json.loads(path.read_text())
    assert path.stem == f"razorattention_{record['model_id']}"
    cfg = ModelConfig(**record["config"])
    heads = RazorAttention().retrieval_heads(cfg)  # "auto" finds this very file by architecture
    assert heads == {tuple(p) for p in record["retrieval_heads"]}
    total = cfg.num_hidden_layers * cfg.num_key_value_heads
    cal = record["calibration"]
    n_ind, n_echo = expected_count(cal["induction_ratio"], total), expected_count(cal["echo_ratio"], total)
    assert max(n_ind, n_echo) <= len(heads) <= n_ind + n_echo
    ind = torch.tensor(record["induction"])
    top = torch.sort(ind.flatten(), descending=True, stable=True).indices[:n_ind]
    assert {(int(i) // cfg.num_key_value_heads, int(i) % cfg.num_key_value_heads) for i in top} <= heads
