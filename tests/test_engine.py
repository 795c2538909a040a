"""Engine behaviour: sampling, stop tokens, stats, errors, device handling."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv import ConfigError, SamplingConfig, ShapeError, UnknownMethodError


def test_stats_fields(tiny_random_model):
    res = mpckv.Engine(tiny_random_model).generate([[1, 2, 3, 4, 5]], max_new_tokens=4, stop_tokens=[])
    st = res.stats
    assert st.method == "dense" and st.prompt_lengths == [5] and st.new_tokens == [4]
    assert len(st.kept_per_layer) == tiny_random_model.config.num_hidden_layers
    assert st.kept_per_layer == [8.0] * 3  # 5 prompt + 3 fed back (the 4th is never fed)
    assert st.kept_fraction == pytest.approx(1.0)
    assert st.live_cache_bytes == st.dense_cache_bytes
    assert st.cache_bytes >= st.live_cache_bytes and st.peak_cache_bytes >= st.cache_bytes
    assert st.prefill_s > 0 and st.decode_s >= 0


def test_stop_tokens(tiny_random_model):
    eng = mpckv.Engine(tiny_random_model)
    free = eng.generate([[7, 8, 9]], max_new_tokens=10, stop_tokens=[])
    first = free.tokens[0][2]
    stopped = eng.generate([[7, 8, 9]], max_new_tokens=10, stop_tokens=[first])
    cut = free.tokens[0].index(first)
    assert stopped.tokens[0] == free.tokens[0][:cut] and stopped.finished == [True]


def test_sampling_is_seeded(tiny_random_model):
    eng = mpckv.Engine(tiny_random_model)
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    a = eng.generate([[1, 2, 3]], max_new_tokens=8, sampling=cfg, stop_tokens=[])
    b = eng.generate([[1, 2, 3]], max_new_tokens=8, sampling=cfg, stop_tokens=[])
    c = eng.generate(
        [[1, 2, 3]], max_new_tokens=8, sampling=SamplingConfig(temperature=1.0, seed=4), stop_tokens=[]
    )
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_top_k_one_is_greedy(tiny_random_model):
    eng = mpckv.Engine(tiny_random_model)
    g = eng.generate([[1, 2, 3]], max_new_tokens=6, stop_tokens=[])
    s = eng.generate(
        [[1, 2, 3]], max_new_tokens=6, sampling=SamplingConfig(temperature=0.7, top_k=1), stop_tokens=[]
    )
    assert g.tokens == s.tokens


def test_errors(tiny_random_model):
    with pytest.raises(UnknownMethodError, match="available"):
        mpckv.Engine(tiny_random_model, "nope")
    with pytest.raises(ConfigError):
        mpckv.Engine(tiny_random_model, "streamingllm", not_a_param=1)
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=0.0)
    eng = mpckv.Engine(tiny_random_model)
    with pytest.raises(ShapeError):
        eng.generate([[]], max_new_tokens=1)
    with pytest.raises(ShapeError, match="token ids"):
        eng.generate([[1, 2, 999]], max_new_tokens=1)
    with pytest.raises(ConfigError):
        eng.generate([[1]], max_new_tokens=-1)


def test_bf16_runs(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    model = mpckv.load_model(path, dtype="bfloat16")
    res = mpckv.Engine(model, "streamingllm", sinks=2, window=4).generate(
        [[1, 2, 3, 4, 5, 6, 7, 8]], 4, stop_tokens=[]
    )
    assert len(res.tokens[0]) == 4 and res.stats.kept_per_layer == [6.0] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    cpu = mpckv.Engine(mpckv.load_model(path)).generate([[5, 6, 7]], 8, stop_tokens=[])
    gpu = mpckv.Engine(mpckv.load_model(path, device="cuda")).generate([[5, 6, 7]], 8, stop_tokens=[])
    assert cpu.tokens == gpu.tokens


def test_extend_then_continue_equals_full_prompt(tiny_random_model):
    """Feeding a question through decode steps after prefill == prefilling context + question (dense)."""
    eng = mpckv.Engine(tiny_random_model)
    ctx_ids, question = list(range(10, 40)), [5, 6, 7, 8]
    full = eng.generate([ctx_ids + question], 6, stop_tokens=[])
    s = eng.prefill([ctx_ids])
    logits = eng.extend(s, torch.tensor([question]))
    assert logits.shape == (1, 4, tiny_random_model.config.vocab_size)
    torch.testing.assert_close(logits[:, -1], eng.prefill([ctx_ids + question]).logits, atol=1e-5, rtol=1e-5)
    cont = eng.continue_generation(s, 6, stop_tokens=[])
    assert cont.tokens == full.tokens
    with pytest.raises(ShapeError):
        eng.extend(s, torch.tensor([[1, 2], [3, 4]]))


@pytest.mark.parametrize("method", ["dense", "h2o", "quest"])
def test_extend_last_logits_equals_all(tiny_random_model, method):
    """``extend(..., logits="last")`` skips the LM head of the teacher-forced tokens but leaves the same
    cache, the same final logits and the same continuation as ``logits="all"``."""
    params = {} if method == "dense" else {"budget": 0.5}
    eng = mpckv.Engine(tiny_random_model, method, **params)
    ctx_ids, question = list(range(10, 50)), [5, 6, 7, 8, 9]
    a, b = eng.prefill([ctx_ids]), eng.prefill([ctx_ids])
    la = eng.extend(a, torch.tensor([question]))
    lb = eng.extend(b, torch.tensor([question]), logits="last")
    assert lb.shape == (1, 1, tiny_random_model.config.vocab_size)
    torch.testing.assert_close(lb[:, 0], la[:, -1])
    for x, y in zip(a.cache.layers, b.cache.layers, strict=True):
        torch.testing.assert_close(x.keys(), y.keys())
    ca = eng.continue_generation(a, 5, stop_tokens=[])
    cb = eng.continue_generation(b, 5, stop_tokens=[])
    assert ca.tokens == cb.tokens
    with pytest.raises(mpckv.errors.ConfigError):
        eng.extend(b, torch.tensor([question]), logits="some")
    with pytest.raises(ShapeError):
        eng.extend(b, torch.zeros(1, 0, dtype=torch.long))
