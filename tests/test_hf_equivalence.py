"""Oracle: our logits match transformers' (fp32, 1e-4) for prefill and 16 cached decode steps."""

from __future__ import annotations

import pytest
import torch

import mpckv

pytestmark = pytest.mark.hf
ARCHS = ["llama", "llama3", "linear", "tied", "qwen2", "mistral", "mistral_swa"]
TOL = 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match(arch, checkpoint_factory):
    path, hf = checkpoint_factory(arch)
    model = mpckv.load_model(path)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids)
    assert ours.shape == ref.shape == (2, 40, 300)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_matches(arch, checkpoint_factory):
    path, hf = checkpoint_factory(arch)
    model = mpckv.load_model(path)
    engine = mpckv.Engine(model, "dense")
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 300, (1, 21), generator=gen)
    steps = torch.randint(0, 300, (16,), generator=gen)
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
        past = out.past_key_values
        session = engine.prefill(prompt)
        torch.testing.assert_close(session.logits, out.logits[:, -1], atol=TOL, rtol=TOL)
        for tok in steps:
            out = hf(tok.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            ours = engine.decode(session, tok.view(1))
            torch.testing.assert_close(ours, out.logits[:, -1], atol=TOL, rtol=TOL)


def test_batched_ragged_prompts_match_single(checkpoint_factory):
    """B > 1 with different prompt lengths gives the same logits as running each prompt alone."""
    path, _ = checkpoint_factory("qwen2")
    model = mpckv.load_model(path)
    engine = mpckv.Engine(model, "dense")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (7, 19, 12)]
    batch = engine.generate(prompts, max_new_tokens=6, stop_tokens=[])
    for p, toks in zip(prompts, batch.tokens, strict=True):
        single = engine.generate([p], max_new_tokens=6, stop_tokens=[])
        assert single.tokens[0] == toks
    # and the batched prefill logits equal the unbatched ones
    s = engine.prefill(prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(s.logits[i], engine.prefill([p]).logits[0], atol=TOL, rtol=TOL)


def test_greedy_generation_matches_hf(checkpoint_factory):
    path, hf = checkpoint_factory("llama")
    model = mpckv.load_model(path)
    prompt = torch.randint(0, 300, (1, 15), generator=torch.Generator().manual_seed(4))
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = mpckv.Engine(model).generate(prompt, max_new_tokens=12, stop_tokens=[])
    assert ours.tokens[0] == ref[0, 15:].tolist()
