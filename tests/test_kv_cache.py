from __future__ import annotations

import pytest
import torch

from mpckv import ShapeError
from mpckv.plaintext.kv_cache import LayerCache


def _cache(b=2, hk=2, d=4):
    return LayerCache(b, hk, d, torch.float32, torch.device("cpu"))


def test_append_ragged_and_views():
    c = _cache()
    k = torch.randn(2, 2, 5, 4)
    c.append(k, k + 1, torch.arange(5).expand(2, 5), counts=torch.tensor([5, 3]))
    assert c.lengths.tolist() == [[5, 5], [3, 3]]
    assert torch.equal(c.keys()[0], k[0])
    # the next append lands right after each row's length
    k2 = torch.randn(2, 2, 1, 4)
    c.append(k2, k2, torch.tensor([[5], [3]]))
    assert torch.equal(c.k[1, :, 3], k2[1, :, 0])
    assert c.pos[1, 0, 3] == 3 and c.lengths.tolist() == [[6, 6], [4, 4]]


def test_compact_frees_memory_and_moves_meta():
    c = _cache(b=1, hk=2)
    k = torch.randn(1, 2, 100, 4)
    c.append(k, k, torch.arange(100)[None])
    c.add_meta("score")
    c.meta["score"][:, :, :100] = torch.arange(100.0)
    before = c.nbytes()
    idx = torch.tensor([[[3, 50, 99], [0, 1, 0]]])
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    c.compact(idx, valid)
    assert c.lengths.tolist() == [[3, 2]]
    assert c.capacity == 3 and c.nbytes() < before / 10
    assert torch.equal(c.k[0, 0], k[0, 0, [3, 50, 99]])
    assert c.meta["score"][0, 0].tolist() == [3.0, 50.0, 99.0]
    assert c.pos[0, 1, :2].tolist() == [0, 1]
    assert c.version == 1


def test_capacity_grows_geometrically():
    c = _cache(b=1, hk=1)
    caps = set()
    for t in range(300):
        x = torch.randn(1, 1, 1, 4)
        c.append(x, x, torch.tensor([[t]]))
        caps.add(c.capacity)
    assert c.max_length == 300 and len(caps) <= 4


def test_shape_errors():
    c = _cache()
    with pytest.raises(ShapeError):
        c.append(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ShapeError):
        c.compact(torch.zeros(2, 5, dtype=torch.long))
