"""VidKV's per-channel codecs against naive references (card: shared/methods/vidkv.md, "Test oracle")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.plaintext.methods.vidkv import channel_split
from mpckv.plaintext.storage.channel_codecs import (
    FFTSignKeys,
    TernaryValues,
    from_real_coefficients,
    parseval_weights,
    real_coefficients,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=10)


@SETTINGS
@given(e=st.integers(1, 33), seed=st.integers(0, 999))
def test_real_fft_round_trip_and_parseval(e, seed):
    g = torch.Generator().manual_seed(seed)
    x, q = torch.randn(3, e, generator=g), torch.randn(3, e, generator=g)
    c = real_coefficients(x)
    assert c.shape == (3, e)  # e free reals: 1 bit per channel, not 2 (the release's complex FFT)
    torch.testing.assert_close(from_real_coefficients(c), x, atol=1e-5, rtol=1e-5)
    dot = (real_coefficients(q) * parseval_weights(e, x.device) * c).sum(-1)
    torch.testing.assert_close(dot, (q * x).sum(-1), atol=1e-4, rtol=1e-4)


def _naive_keys(x, perm, n_hi, g):
    """Loop reference of the intended VidKV key dequantization for x [T, d] (one row): per group of g
    tokens, 2-bit RTN per high-range channel; real FFT over the other channels, sign × mean|coef|."""
    xp = x[:, perm]
    out = torch.empty_like(xp)
    for t0 in range(0, x.shape[0], g):
        blk = xp[t0 : t0 + g]
        for c in range(n_hi):
            col = blk[:, c]
            lo, hi = col.min(), col.max()
            s = (hi - lo) / 3
            qq = torch.clamp(torch.round((col - lo) / s), 0, 3) if s > 0 else torch.zeros_like(col)
            out[t0 : t0 + g, c] = qq * s + lo
        if n_hi < x.shape[1]:
            e = x.shape[1] - n_hi
            fr = torch.fft.rfft(blk[:, n_hi:], dim=-1)
            coefs = [fr.real[:, j] for j in range(e // 2 + 1)] + [
                fr.imag[:, j] for j in range(1, 1 + (e - 1) // 2)
            ]
            deq = []
            for col in coefs:
                s = col.abs().mean()
                deq.append(torch.where(col >= 0, s, -s))
            nr = e // 2 + 1
            real = torch.stack(deq[:nr], -1)
            imag = torch.zeros_like(real)
            if len(deq) > nr:
                imag[:, 1 : 1 + len(deq) - nr] = torch.stack(deq[nr:], -1)
            out[t0 : t0 + g, n_hi:] = torch.fft.irfft(torch.complex(real, imag), n=e, dim=-1)
    res = torch.empty_like(out)
    res[:, perm] = out
    return res


@pytest.mark.parametrize(("d", "n_hi", "g"), [(16, 8, 4), (15, 7, 3), (16, 0, 4), (16, 16, 8), (12, 5, 6)])
def test_fft_sign_keys_match_naive_reference(d, n_hi, g):
    gen = torch.Generator().manual_seed(d + n_hi)
    x = torch.randn(2, 2, 2 * g, d, generator=gen) * torch.linspace(0.2, 3.0, d)
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(4)]).view(2, 2, d)
    codec = FFTSignKeys(g, perm, n_hi, torch.float32)
    enc = codec.encode(x)
    deq = codec.decode(enc)
    for b in range(2):
        for h in range(2):
            torch.testing.assert_close(
                deq[b, h], _naive_keys(x[b, h], perm[b, h], n_hi, g), atol=1e-4, rtol=1e-4
            )
    q = torch.randn(2, 2, 3, d, generator=gen)
    torch.testing.assert_close(codec.scores(q, enc), q @ deq.transpose(-1, -2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [1.58, 2])
def test_values_match_naive_reference(bits):
    gen = torch.Generator().manual_seed(3)
    g, d = 4, 10
    x = torch.randn(1, 2, 3 * g, d, generator=gen)
    codec = TernaryValues(g, d, bits, torch.float32)
    enc = codec.encode(x)
    deq = codec.decode(enc)
    for h in range(2):
        for t0 in range(0, 3 * g, g):
            for c in range(d):
                col = x[0, h, t0 : t0 + g, c]
                if bits == 1.58:
                    s = col.abs().mean()
                    ref = torch.where(col > s / 2, s, torch.where(col < -s / 2, -s, 0.0))
                else:
                    s = (col.max() - col.min()) / 3
                    ref = torch.round((col - col.min()) / s).clamp(0, 3) * s + col.min()
                torch.testing.assert_close(deq[0, h, t0 : t0 + g, c], ref, atol=1e-5, rtol=1e-5)
    p = torch.softmax(torch.randn(1, 2, 3, 3 * g, generator=gen), -1)
    torch.testing.assert_close(codec.weighted(p, enc), p @ deq, atol=1e-5, rtol=1e-5)


def test_channel_split_takes_the_largest_ranges():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 9, 8, generator=gen) * torch.tensor([1, 9, 1, 5, 1, 1, 7, 1.0])
    k[1, 0, 6:] = 100.0  # beyond the row's length: ignored
    lengths = torch.tensor([[9, 9], [6, 9]])
    perm = channel_split(k, lengths, 3)
    for b in range(2):
        for h in range(2):
            n = int(lengths[b, h])
            rng = k[b, h, :n].amax(0) - k[b, h, :n].amin(0)
            top = set(torch.topk(rng, 3).indices.tolist())
            assert set(perm[b, h, :3].tolist()) == top
            assert sorted(perm[b, h].tolist()) == list(range(8))
