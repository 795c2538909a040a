from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpckv.plaintext.methods.topk import select_topk


def test_ties_go_to_lower_index_and_sorted():
    s = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    idx, valid = select_topk(s, 2)
    assert idx.tolist() == [[1, 2]] and valid.all()


def test_forced_and_invalid():
    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    forced = torch.tensor([[False, False, False, False, True]])
    invalid = torch.tensor([[True, False, False, False, False]])
    idx, valid = select_topk(s, 2, forced, invalid)
    assert idx[valid].tolist() == [1, 4]
    # forced entries are kept even beyond k
    idx, valid = select_topk(s, 0, forced)
    assert idx[valid].tolist() == [4]


def test_ragged_k_per_row():
    s = torch.arange(12, dtype=torch.float32).view(2, 6)
    idx, valid = select_topk(s, torch.tensor([1, 3]))
    assert valid.sum(-1).tolist() == [1, 3]
    assert idx[0][valid[0]].tolist() == [5]
    assert idx[1][valid[1]].tolist() == [3, 4, 5]
    assert (idx[~valid] == 0).all()


@settings(derandomize=True, database=None, max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(0, 45), seed=st.integers(0, 2**16), ties=st.booleans())
def test_matches_naive(n, k, seed, ties):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 4, (n,), generator=g).float() if ties else torch.rand(n, generator=g)
    invalid = torch.rand(n, generator=g) < 0.2
    forced = (torch.rand(n, generator=g) < 0.1) & ~invalid
    idx, valid = select_topk(s[None], k, forced[None], invalid[None])
    got = idx[0][valid[0]].tolist()
    # naive: forced first, then by (-score, index) among valid, take max(k, #forced) clipped to #valid
    cand = sorted((i for i in range(n) if not invalid[i]), key=lambda i: (not forced[i], -float(s[i]), i))
    want_n = min(max(k, int(forced.sum())), len(cand))
    assert got == sorted(cand[:want_n])
    assert len(set(got)) == len(got)
