"""ChunkKVStore: keys, round trips, LRU, pins, references, corruption, concurrent writers."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os

import pytest
import torch

from mpckv.plaintext.fusion.store import ChunkKV, ChunkKVStore, chunk_key, model_fingerprint

from .helpers import ROPES, make_model


def _chunk(store: ChunkKVStore, ids, seed=0, n_layers=2) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_layers, 2, len(ids), 8, generator=g)
    return ChunkKV(store.key(ids), tuple(ids), k, torch.randn(k.shape, generator=g))


def test_keys_are_stable_and_cover_model_identity():
    m = make_model()
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(make_model())  # same weights, same key in a fresh object
    assert chunk_key(fp, [1, 2, 3]) == chunk_key(fp, (1, 2, 3))
    assert chunk_key(fp, [1, 2, 3]) != chunk_key(fp, [1, 2, 4])
    assert fp != model_fingerprint(make_model(seed=1))
    assert fp != model_fingerprint(make_model("linear"))
    cfg = dataclasses.replace(m.config, rope=dataclasses.replace(ROPES["default"], theta=5e5))
    m2 = make_model()
    m2.config = cfg
    assert fp != model_fingerprint(m2)
    assert fp != model_fingerprint(make_model().to(dtype=torch.bfloat16))


def test_memory_and_disk_round_trip(tmp_path):
    s = ChunkKVStore("fp", tmp_path)
    c = _chunk(s, [5, 6, 7])
    s.put(c)
    assert s.get(c.key) is c and s.stats.memory_hits == 1
    fresh = ChunkKVStore("fp", tmp_path)  # another process / restart: only the disk tier
    got = fresh.get(c.key)
    assert got is not None and fresh.stats.disk_hits == 1 and got.token_ids == (5, 6, 7)
    torch.testing.assert_close(got.k, c.k, rtol=0, atol=0)
    torch.testing.assert_close(got.v, c.v, rtol=0, atol=0)
    assert fresh.get(c.key) is got and fresh.stats.memory_hits == 1  # promoted
    assert ChunkKVStore("other", tmp_path).get(c.key) is None  # a different model never sees it
    assert fresh.get(s.key([9])) is None and fresh.stats.misses == 1
    assert fresh.stats.hit_rate == pytest.approx(2 / 3)


def test_bf16_round_trip(tmp_path):
    s = ChunkKVStore("fp", tmp_path)
    c = _chunk(s, [1, 2])
    c = ChunkKV(c.key, c.token_ids, c.k.bfloat16(), c.v.bfloat16())
    s.put(c)
    got = ChunkKVStore("fp", tmp_path).get(c.key)
    assert got is not None and got.k.dtype == torch.bfloat16 and torch.equal(got.k, c.k)


def test_memory_lru_order_refs_and_pins():
    now = [0.0]
    probe = ChunkKVStore("fp", memory_bytes=10**9)
    size = _chunk(probe, [1, 2, 3, 4]).nbytes
    s = ChunkKVStore("fp", memory_bytes=2 * size, clock=lambda: now[0])
    a, b, c, d = (_chunk(s, [i, i, i, i], i) for i in range(4))
    s.put(a)
    s.put(b)
    s.get(a.key)  # b is now least recently used
    s.put(c)
    assert s.in_memory(a.key) and not s.in_memory(b.key) and s.in_memory(c.key)
    assert s.stats.memory_evictions == 1
    with s.use([a.key]):  # referenced: never evicted, c goes instead
        s.get(c.key)
        s.put(d)
        assert s.in_memory(a.key) and not s.in_memory(c.key)
    assert s.refcount(a.key) == 0
    s.pin(d.key, ttl_s=10)
    s.get(a.key)  # d is LRU but pinned
    s.put(b)
    assert s.in_memory(d.key) and not s.in_memory(a.key)
    now[0] = 11.0  # pin expired
    s.get(b.key)
    s.put(c)
    assert not s.in_memory(d.key) and s.in_memory(b.key) and s.in_memory(c.key)


def test_disk_budget_evicts_oldest(tmp_path):
    s = ChunkKVStore("fp", tmp_path, memory_bytes=0)
    chunks = [_chunk(s, [i] * 4, i) for i in range(3)]
    s.put(chunks[0])
    s.put(chunks[1])
    one = os.path.getsize(s._path(chunks[0].key))
    os.utime(s._path(chunks[0].key), (1000, 1000))
    os.utime(s._path(chunks[1].key), (2000, 2000))
    s.disk_bytes = 2 * one + one // 2
    ChunkKVStore("fp", tmp_path, memory_bytes=0).get(chunks[0].key)  # a hit touches the file: 1 is oldest
    s.put(chunks[2])
    assert chunks[0].key in s and chunks[1].key not in s and chunks[2].key in s
    assert s.stats.disk_evictions == 1 and s.disk_used() <= s.disk_bytes


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) - 7]))
    elif how == "flip_data":
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "flip_header":
        data[12] ^= 0x5A
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncate", "flip_data", "flip_header", "empty"])
def test_corrupt_file_is_detected_and_recomputed(tmp_path, how):
    s = ChunkKVStore("fp", tmp_path)
    c = _chunk(s, [3, 1, 4, 1, 5])
    s.put(c)
    _corrupt(s._path(c.key), how)
    reader = ChunkKVStore("fp", tmp_path)
    assert reader.get(c.key) is None
    assert reader.stats.corrupt == 1 and not s._path(c.key).exists()
    calls = []

    def compute(ids):
        calls.append(ids)
        return c.k, c.v

    got, hit = reader.get_or_compute(c.token_ids, compute)
    assert not hit and len(calls) == 1 and torch.equal(got.k, c.k)
    assert ChunkKVStore("fp", tmp_path).get(c.key) is not None  # rewritten, valid again


def test_mismatched_file_is_rejected(tmp_path):
    s = ChunkKVStore("fp", tmp_path)
    a, b = _chunk(s, [1, 2]), _chunk(s, [3, 4])
    s.put(a)
    dst = s._path(b.key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(s._path(a.key).read_bytes())  # a's file under b's name
    reader = ChunkKVStore("fp", tmp_path)
    assert reader.get(b.key) is None and reader.stats.corrupt == 1
    assert reader.get(a.key) is not None


def _writer(directory: str, seed: int, rounds: int) -> None:
    s = ChunkKVStore("fp", directory, memory_bytes=0)
    for r in range(rounds):
        s.put(_chunk(s, [7] * 64, 0, n_layers=4))  # the same key from both processes
        s.put(_chunk(s, [seed, r] * 8, r))
        got = s.get(s.key([7] * 64))
        assert got is not None


def test_concurrent_writers_do_not_corrupt(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), seed, 30)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reader = ChunkKVStore("fp", tmp_path)
    files = list(tmp_path.glob("*/*.safetensors"))
    assert len(files) == 1 + 2 * 30
    for f in files:
        assert reader.get(f.stem) is not None
    assert reader.stats.corrupt == 0
    assert not list(tmp_path.glob("*/*.tmp"))
    want = _chunk(reader, [7] * 64, 0, n_layers=4)
    got = reader.get(want.key)
    assert got is not None and torch.equal(got.k, want.k)
