"""Chunk caches are computed behind the model's BOS (the attention sink), and fusion stays exact in bf16
at large offsets (issue 14: fused accuracy on qwen at 4K tokens)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mpckv
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion.assemble import compute_chunk, sink_prefix
from mpckv.random_model import random_llama, small_config

from .helpers import rand_ids

BOS = 255
RAW = 2100  # raw tokens before the chunks: chunk offsets in the thousands


def bos_model(dtype: torch.dtype = torch.float32, max_pos: int = 8192):
    cfg = small_config(num_hidden_layers=3, hidden_size=32, head_dim=8)
    cfg = dataclasses.replace(cfg, bos_token_id=BOS, max_position_embeddings=max_pos)
    return random_llama(cfg, seed=3).to(dtype=dtype)


def flat(segs):
    return [t for s in segs for t in s.token_ids]


def test_sink_prefix_is_the_bos_token():
    assert sink_prefix(bos_model()) == (BOS,)
    m = bos_model()
    m.config = dataclasses.replace(m.config, bos_token_id=None)
    assert sink_prefix(m) == ()


def test_single_chunk_behind_bos_equals_full_prefill():
    """CacheBlend's oracle: one chunk placed right after the lead token it was computed behind reuses
    exactly the cache full prefill computes (before the fix the chunk had its own sink and differed)."""
    m = bos_model()
    segs = [Raw([BOS]), Chunk(rand_ids(30, 1)), Raw(rand_ids(5, 2))]
    out = mpckv.Engine(m).prefill_segments(segs, "concat")
    full = mpckv.Engine(m).prefill([flat(segs)])
    for a, b in zip(out.session.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(a.keys(), b.keys(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values(), b.values(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.session.logits, full.logits, atol=1e-4, rtol=1e-4)


def test_explicit_empty_prefix_is_the_standalone_prefill():
    m = bos_model()
    ids = rand_ids(12, 4)
    k, v = compute_chunk(m, ids, prefix=())
    sess = mpckv.Engine(m).prefill([ids])
    torch.testing.assert_close(k[1], sess.cache[1].keys()[0])
    torch.testing.assert_close(v[1], sess.cache[1].values()[0])


def _long_prompt(seed: int = 0):
    """BOS, a long raw block (pushes the chunks to offsets in the thousands), three chunks, a question."""
    return [
        Raw([BOS]),
        Raw(rand_ids(RAW, seed + 10)),
        *(Chunk(rand_ids(n, seed + i)) for i, n in enumerate((40, 33, 47))),
        Raw(rand_ids(6, seed + 20)),
    ]


def test_bf16_rotation_at_large_offsets_matches_direct_keys():
    """Layer-0 keys depend only on the token and its position: re-rotated canonical bf16 keys at offsets
    past 2,000 must match the keys full prefill computes there, to bf16 rounding (fp32 angles)."""
    m = bos_model(torch.bfloat16)
    segs = _long_prompt()
    out = mpckv.Engine(m).prefill_segments(segs, "concat")
    full = mpckv.Engine(m).prefill([flat(segs)])
    a, b = out.session.cache[0].keys()[0].float(), full.cache[0].keys()[0].float()
    rows = slice(RAW + 1, RAW + 1 + 120)
    err = (a[:, rows] - b[:, rows]).abs().max() / b[:, rows].abs().max()
    assert float(err) < 2e-2


@pytest.mark.parametrize("name", ["cacheblend", "a3"])
def test_bf16_ratio_one_equals_full_prefill_at_large_offsets(name):
    """The oracle: every row recomputed ⇒ the fused cache and logits are full prefill's, in bf16, with the
    chunks at positions past 2,000."""
    m = bos_model(torch.bfloat16)
    segs = _long_prompt(1)
    out = mpckv.Engine(m).prefill_segments(segs, name, ratio=1.0)
    full = mpckv.Engine(m).prefill([flat(segs)])
    assert out.stats.recompute_ratio == 1.0
    for a, b in zip(out.session.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(a.keys().float(), b.keys().float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a.values().float(), b.values().float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.session.logits.float(), full.logits.float(), atol=3e-2, rtol=3e-2)
