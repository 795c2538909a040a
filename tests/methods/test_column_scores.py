"""Oracles of the fast all-query column sums (H2O / Keyformer prefill) and of Keyformer's block noise."""

from __future__ import annotations

import pytest
import torch

from mpckv.plaintext.methods.column_scores import ROW_BLOCK, all_query_votes, causal_column_sums
from mpckv.plaintext.methods.keyformer import block_gumbel, noisy_column_scores
from mpckv.plaintext.methods.scorers import window_votes

from .test_snapkv import make_ctx

LENGTHS = [ROW_BLOCK * 2 + 37, ROW_BLOCK - 5, 1]  # several blocks, a short row, a single token


def _naive(q, k, n, scale, tau=1.0, noise=None):
    """Explicit fp32 ``[H, n]`` column sums for one sample (``q [H, T, d]``, ``k [Hk, T, d]``)."""
    g = q.shape[0] // k.shape[0]
    x = (q[:, :n].double() @ k.repeat_interleave(g, 0)[:, :n].double().transpose(-1, -2)) * scale
    if noise is not None:
        x = x + noise[:, :n, :n].double()
    x = (x / tau).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(x, -1).sum(1)


@pytest.mark.parametrize("group_reduce", ["sum", "mean", "max"])
def test_all_query_votes_equal_window_votes_of_the_whole_prompt(group_reduce):
    ctx, _, _ = make_ctx(LENGTHS, seed=3)
    ref = window_votes(ctx, ctx.q.shape[2], group_reduce)
    got = all_query_votes(ctx, group_reduce)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    per = all_query_votes(ctx, per_query_head=True)
    torch.testing.assert_close(per, window_votes(ctx, 10**6, per_query_head=True), rtol=1e-5, atol=1e-5)


def test_column_sums_match_a_naive_softmax_and_ignore_garbage_padding():
    ctx, q, k = make_ctx(LENGTHS, seed=4)
    k = k.clone()
    for b, n in enumerate(LENGTHS):
        k[b, :, n:] = float("nan")  # padding keys may hold anything
    got = causal_column_sums(q, k, torch.tensor(LENGTHS), ctx.scale)
    assert torch.isfinite(got).all()
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(
            got[b, :, :n].double(), _naive(q[b], k[b], n, ctx.scale), rtol=1e-5, atol=1e-5
        )
        assert (got[b, :, n:] == 0).all()
        # every real query contributes mass 1
        torch.testing.assert_close(got[b].sum(-1), torch.full((q.shape[1],), float(n)))


def test_noisy_column_sums_match_the_naive_softmax_of_the_same_draws():
    n, tau = ROW_BLOCK + 70, 1.7
    ctx, q, k = make_ctx([n], seed=5)
    h = q.shape[1]
    noise = torch.cat(
        [block_gumbel(9, 2, h, r0, min(ROW_BLOCK, n - r0), n) for r0 in range(0, n, ROW_BLOCK)], 1
    )
    got = noisy_column_scores(q, k, torch.tensor([n]), ctx.scale, tau, 0.5, 9, 2)
    ref = _naive(q[0], k[0], n, ctx.scale, tau, 0.5 * noise)
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-5)


def test_noise_depends_on_positions_only_not_on_batch_or_prompt_length():
    ctx, q, k = make_ctx([ROW_BLOCK + 90, ROW_BLOCK - 20], seed=6)
    both = noisy_column_scores(q, k, ctx.prompt_lengths, ctx.scale, 1.0, 1.0, 4, 1)
    t = ROW_BLOCK - 20
    alone = noisy_column_scores(q[1:, :, :t], k[1:, :, :t], torch.tensor([t]), ctx.scale, 1.0, 1.0, 4, 1)
    torch.testing.assert_close(both[1:, :, :t], alone, rtol=1e-6, atol=1e-6)
    other_seed = noisy_column_scores(q, k, ctx.prompt_lengths, ctx.scale, 1.0, 1.0, 5, 1)
    other_layer = noisy_column_scores(q, k, ctx.prompt_lengths, ctx.scale, 1.0, 1.0, 4, 2)
    assert not torch.allclose(both, other_seed) and not torch.allclose(both, other_layer)
    torch.testing.assert_close(both.sum(-1), ctx.prompt_lengths[:, None].float().expand(2, 4))


def test_block_gumbel_is_repeatable_with_gumbel_moments_and_zero_past_its_rectangle():
    a = block_gumbel(3, 0, 4, ROW_BLOCK, ROW_BLOCK, 3 * ROW_BLOCK)
    assert torch.equal(a, block_gumbel(3, 0, 4, ROW_BLOCK, ROW_BLOCK, 3 * ROW_BLOCK))
    assert (a[..., 2 * ROW_BLOCK :] == 0).all()
    body = a[..., : 2 * ROW_BLOCK]
    assert torch.isfinite(body).all()
    # Gumbel(0, 1): mean = Euler–Mascheroni ≈ 0.5772, variance = π²/6 ≈ 1.645
    assert abs(float(body.mean()) - 0.5772) < 0.02
    assert abs(float(body.var()) - 1.6449) < 0.05
    # a cut of the block is a prefix of the full draw; blocks differ
    torch.testing.assert_close(block_gumbel(3, 0, 4, ROW_BLOCK, 7, 50), a[:, :7, :50])
    assert not torch.equal(block_gumbel(3, 0, 4, 0, 8, 8), a[:, :8, :8])
    with pytest.raises(ValueError):
        block_gumbel(3, 0, 4, 5, 1, 1)
