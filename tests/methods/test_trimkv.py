"""TRIM-KV oracles (card: shared/methods/trimkv.md) and its gate distillation."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv import ConfigError
from mpckv.calibrate import CALIBRATION_DIR
from mpckv.calibrate.trimkv_gates import (
    GateTraining,
    distill_loss,
    init_gates,
    load_gates,
    save_gates,
    soft_forward,
    train_gates,
)
from mpckv.plaintext.methods.trimkv import LOG_BETA, TrimKV


def _prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _steps(model, method, prompts, steps):
    eng = mpckv.Engine(model, method)
    s = eng.prefill(prompts)
    out = [s.logits]
    for _ in range(steps):
        out.append(eng.decode(s, s.logits.argmax(-1)))
    return s, out


def test_constant_retention_with_sinks_equals_streamingllm(tiny_random_model):
    prompts = [_prompt(40), _prompt(31, 1)]
    cap = 14
    trim = TrimKV(gates="constant", buffer_size=1, sinks=3, recent=0, budget=cap - 1)
    stream = mpckv.get_method("streamingllm", sinks=3, budget=cap)
    _s1, a = _steps(tiny_random_model, trim, prompts, 8)
    _s2, b = _steps(tiny_random_model, stream, prompts, 8)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_constant_retention_keeps_the_most_recent_m(tiny_random_model):
    m, buf = 10, 4
    s, _ = _steps(
        tiny_random_model, TrimKV(gates="constant", buffer_size=buf, recent=0, budget=m), [_prompt(40)], 9
    )
    # prefill: 40 ≥ M + buffer → compressed to M; then it grows to M + buffer − 1 before every compression
    for lc in s.cache.layers:
        n = int(lc.lengths[0, 0])
        assert (lc.lengths == n).all() and m <= n < m + buf
        newest = 40 + 9
        assert sorted(lc.pos[0, 0, :n].tolist()) == list(range(newest - n, newest))


def test_compression_only_at_m_plus_buffer_and_exactly_m_after(tiny_random_model):
    eng = mpckv.Engine(tiny_random_model, TrimKV(gates="constant", buffer_size=5, budget=12))
    s = eng.prefill([_prompt(16)])  # 16 < 12 + 5: untouched
    assert s.cache.layers[0].lengths.tolist() == [[16, 16]]
    eng.decode(s, s.logits.argmax(-1))  # 17 ≥ 17 → compressed to 12
    assert s.cache.layers[0].lengths.tolist() == [[12, 12]]
    for expect in (13, 14, 15, 16, 12):
        eng.decode(s, s.logits.argmax(-1))
        assert s.cache.layers[0].lengths.tolist() == [[expect, expect]]


def test_retention_scores_follow_the_formula(tiny_random_model, tmp_path):
    cfg = tiny_random_model.config
    gates = init_gates(cfg, hidden=8, bias=0.0, seed=1)
    for g in gates:
        g.w2.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "g.safetensors"
    save_gates(gates, path, {"config": __import__("mpckv.calibrate").calibrate.config_signature(cfg)})
    eng = mpckv.Engine(tiny_random_model, TrimKV(gates=str(path), buffer_size=3, recent=0, budget=9))
    s = eng.prefill([_prompt(30)])
    for _ in range(4):
        eng.decode(s, s.logits.argmax(-1))
    for layer, lc in enumerate(s.cache.layers):
        n = lc.max_length
        lb = gates[layer].log_beta(lc.keys(), lc.values())
        torch.testing.assert_close(lc.meta[LOG_BETA][:, :, :n], lb, rtol=1e-5, atol=1e-6)
        assert (lb <= 0).all()
    # the kept set is the top-M of (t − p)·log β among what was there at the last compression
    assert all(int(lc.lengths.max()) < 9 + 3 for lc in s.cache.layers)


def test_gate_shapes_bias_and_file_checks(tiny_random_model, tmp_path):
    cfg = tiny_random_model.config
    gates = init_gates(cfg, hidden=4, bias=10.0, seed=0)
    k = torch.randn(2, cfg.num_key_value_heads, 7, cfg.head_dim)
    lb = gates[0].log_beta(k, torch.randn_like(k))
    assert lb.shape == (2, cfg.num_key_value_heads, 7) and (lb <= 0).all()
    torch.testing.assert_close(lb.exp(), torch.full_like(lb, 0.99995), atol=1e-5, rtol=0)
    path = tmp_path / "g.safetensors"
    save_gates(gates, path, {"config": {"vocab_size": 1}})
    with pytest.raises(ConfigError, match="another model"):
        load_gates(path, cfg)
    with pytest.raises(ConfigError, match="no shipped gates"):
        mpckv.Engine(tiny_random_model, "trimkv", budget=8)
    with pytest.raises(ConfigError):
        TrimKV(constant_log_beta=0.0)


def test_soft_forward_without_gates_is_dense_and_loss_is_small_at_high_bias(tiny_random_model):
    ids = torch.tensor([_prompt(24)])
    dense = tiny_random_model(ids)
    torch.testing.assert_close(soft_forward(tiny_random_model, ids, None)[0], dense, rtol=1e-4, atol=1e-4)
    gates = init_gates(tiny_random_model.config, hidden=4, bias=30.0, seed=0)
    _loss, kl, kept = distill_loss(tiny_random_model, ids, gates, memory=100, weight=1.0)
    assert kl < 1e-6 and kept == pytest.approx(24.0, abs=1e-3)


@pytest.mark.slow
def test_a_few_training_steps_reduce_the_held_out_loss(tmp_path):
    from mpckv.calibrate.trimkv_gates import training_sequences
    from mpckv.tokenizer import ByteTokenizer

    model = mpckv.load_model("tiny")
    cfg = GateTraining(memory=16, seq_len=64, steps=15, batch=2, lr=1e-2, minutes=2.0)
    info = train_gates(model, cfg, tmp_path / "g.safetensors", "tiny")
    assert info["steps"] == 15
    ids, tw = training_sequences(ByteTokenizer().encode, 2, 64, seed=4242)
    with torch.no_grad():
        before = distill_loss(model, ids, init_gates(model.config, 64, cfg.bias_init, 0), 16, 1.0)[0]
        after = distill_loss(model, ids, load_gates(tmp_path / "g.safetensors", model.config), 16, 1.0)[0]
    assert float(after) < float(before)


def _kl_to_dense(model, method, prompts, cont):
    dense, eng = mpckv.Engine(model), mpckv.Engine(model, method)
    total = 0.0
    for p in prompts:
        a = dense.extend(dense.prefill([p]), [cont]).log_softmax(-1)
        b = eng.extend(eng.prefill([p]), [cont]).log_softmax(-1)
        total += float((a.exp() * (a - b)).sum(-1).mean())
    return total / len(prompts)


@pytest.mark.slow  # ~30 s alone, minutes under the Triton interpreter on a busy CPU
def test_trained_tiny_gates_beat_constant_gates():
    from mpckv.calibrate.trimkv_gates import training_sequences
    from mpckv.tokenizer import ByteTokenizer

    assert sorted(CALIBRATION_DIR.glob("trimkv_tiny-*.safetensors")), "shipped tiny gates"
    model = mpckv.load_model("tiny")
    seqs = training_sequences(ByteTokenizer().encode, 4, 544, seed=987_654)[0]  # held-out seeds
    prompts = [s[:512].tolist() for s in seqs]
    conts = [s[512:].tolist() for s in seqs]
    kw = dict(budget=64, buffer_size=8)
    trained = sum(_kl_to_dense(model, TrimKV(**kw), [p], c) for p, c in zip(prompts, conts, strict=True))
    const = sum(
        _kl_to_dense(model, TrimKV(gates="constant", **kw), [p], c)
        for p, c in zip(prompts, conts, strict=True)
    )
    assert trained < 0.8 * const, (trained, const)
