"""RoPE re-rotation: inverse, equality with computing at an offset, refusal, the self-check."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import mpckv
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion import rerotate as rr
from mpckv.plaintext.fusion.rerotate import (
    FusionDisabled,
    RotationError,
    check_rotatable,
    rotate_chunk,
    rotation_self_check,
)
from mpckv.plaintext.rope import rerotate as rope_rerotate

from .helpers import ROPES, make_model, rand_ids


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_plus_then_minus_is_identity(rope):
    m = make_model(rope)
    k = torch.randn(3, 2, 11, 8, generator=torch.Generator().manual_seed(1))
    for delta in (1, 7, 333, 1500):
        back = rotate_chunk(rotate_chunk(k, delta, m.inv_freq), -delta, m.inv_freq)
        torch.testing.assert_close(back, k, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(rotate_chunk(k, 5, m.inv_freq), k)


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rotating_canonical_equals_computing_at_offset(rope):
    m = make_model(rope)
    ids = torch.tensor([rand_ids(12, 3)])
    hidden = m.embed(ids)
    base = torch.arange(12)[None]
    _, k0, _ = m.qkv(1, hidden, base)
    for delta in (1, 40, 700):
        _, kd, _ = m.qkv(1, hidden, base + delta)
        torch.testing.assert_close(rotate_chunk(k0, delta, m.inv_freq), kd, atol=5e-5, rtol=1e-4)


def test_length_dependent_rope_refused():
    for kind in ("dynamic", "yarn", "longrope"):
        with pytest.raises(RotationError, match="cannot be re-rotated"):
            check_rotatable(types.SimpleNamespace(rope_type=kind))
    for kind in ROPES:
        check_rotatable(ROPES[kind])


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_self_check_passes(rope):
    check = rotation_self_check(make_model(rope))
    assert check.ok and check.max_error < 1e-3, check


def test_broken_rotation_disables_fusion_loudly(monkeypatch):
    def wrong(keys, delta, inv_freq):  # off by one position
        return rope_rerotate(keys, delta + 1, inv_freq)

    monkeypatch.setattr(rr, "rerotate", wrong)
    m = make_model()
    eng = mpckv.Engine(m)
    segs = [Chunk(rand_ids(10, 1)), Chunk(rand_ids(10, 2)), Raw(rand_ids(4, 3))]
    with pytest.warns(RuntimeWarning, match="KV fusion disabled"):
        out = eng.prefill_segments(segs, "cacheblend")
    assert not out.stats.fused and out.stats.fallback
    ids = [t for s in segs for t in s.token_ids]
    torch.testing.assert_close(out.session.logits, eng.prefill([ids]).logits)
    with warnings.catch_warnings(), pytest.raises(FusionDisabled):
        warnings.simplefilter("ignore")
        eng.prefill_segments(segs, "cacheblend", strict_check=True)
