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


def test_capacity_grows_in_chunks():
    c = _cache(b=1, hk=1)
    caps = set()
    for t in range(300):
        x = torch.randn(1, 1, 1, 4)
        c.append(x, x, torch.tensor([[t]]))
        caps.add(c.capacity)
    assert c.max_length == 300 and len(caps) <= 6


def _kv_alloc(c):
    return 2 * c.capacity * c.batch * c.kv_heads * c.head_dim * c.element_bytes


def test_allocated_stays_within_ten_percent_of_live():
    c = LayerCache(1, 2, 64, torch.float32, torch.device("cpu"))
    k = torch.randn(1, 2, 2000, 64)
    c.append(k, k, torch.arange(2000)[None])
    assert _kv_alloc(c) == c.live_bytes()  # the prompt is allocated exactly
    grows = 0
    for t in range(2000, 4200):
        cap = c.capacity
        x = torch.randn(1, 2, 1, 64)
        c.append(x, x, torch.tensor([[t]]))
        grows += c.capacity != cap
        assert _kv_alloc(c) <= 1.1 * c.live_bytes()
    assert grows <= 14  # chunked, not one reallocation per token
    assert torch.equal(c.keys()[0, :, :2000], k[0])


def test_reserve_preallocates_without_changing_content():
    c = _cache(b=1, hk=1)
    k = torch.randn(1, 1, 10, 4)
    c.append(k, k, torch.arange(10)[None])
    c.reserve(100)
    assert c.capacity == 100 and torch.equal(c.keys(), k)
    for t in range(10, 100):
        x = torch.randn(1, 1, 1, 4)
        c.append(x, x, torch.tensor([[t]]))
        assert c.capacity == 100
    c.reserve(20)  # never shrinks
    assert c.capacity == 100


def test_remove_one_moves_the_last_entry():
    c = _cache(b=2, hk=1)
    k = torch.randn(2, 1, 6, 4)
    c.append(k, k * 2, torch.arange(6).expand(2, 6), counts=torch.tensor([6, 4]))
    c.add_meta("score")
    c.meta["score"][:, :, :6] = torch.arange(6.0)
    c.remove_one(torch.tensor([[2], [-1]]))
    assert c.lengths.tolist() == [[5], [4]] and c.version == 1
    assert c.positions()[0, 0].tolist() == [0, 1, 5, 3, 4]
    assert torch.equal(c.keys()[0, 0], k[0, 0, [0, 1, 5, 3, 4]])
    assert torch.equal(c.values()[0, 0], 2 * k[0, 0, [0, 1, 5, 3, 4]])
    assert c.meta["score"][0, 0, :5].tolist() == [0.0, 1.0, 5.0, 3.0, 4.0]
    assert torch.equal(c.keys()[1, 0, :4], k[1, 0, :4])  # untouched row
    c.remove_one(torch.tensor([[4], [3]]))  # removing the last entry itself
    assert c.lengths.tolist() == [[4], [3]] and c.positions()[0, 0, :4].tolist() == [0, 1, 5, 3]


def test_shape_errors():
    c = _cache()
    with pytest.raises(ShapeError):
        c.append(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ShapeError):
        c.compact(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ShapeError):
        c.remove_one(torch.zeros(2, dtype=torch.long))
