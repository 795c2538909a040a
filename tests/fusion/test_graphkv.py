"""Graph-KV's segment-graph mask and shared positions: the card's oracles."""

from __future__ import annotations

import pytest
import torch

import mpckv
from mpckv.errors import ConfigError
from mpckv.plaintext.fusion import Chunk, Raw
from mpckv.plaintext.fusion.assemble import compute_chunk
from mpckv.plaintext.fusion.graphkv import GraphKV

from .helpers import make_model, rand_ids
from .test_fusion_oracles import assert_same_as_full

LENS = (20, 17, 25)
Q = 6


def segments(seed=0):
    return [Chunk(rand_ids(n, seed + i + 1)) for i, n in enumerate(LENS)] + [Raw(rand_ids(Q, seed + 9))]


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_causal_graph_sequential_positions_is_causal_prefill(rope):
    m = make_model(rope)
    out = mpckv.Engine(m).prefill_segments(segments(), "graphkv", graph="causal", layout="sequential")
    assert_same_as_full(m, out, segments())
    assert out.stats.compute_fraction == 1.0


def test_one_source_one_target_is_sequential_prefill(model):
    """P = 0, source of length L: the target sits right after it, reads it fully → plain prefill of [s; t]."""
    s, t = Chunk(rand_ids(20, 1)), Chunk(rand_ids(14, 2))
    out = mpckv.Engine(model).prefill_segments([s, t], "graphkv", sources=1)
    full = mpckv.Engine(model).prefill([list(s.token_ids) + list(t.token_ids)])
    for a, b in zip(out.session.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(a.keys(), b.keys(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values(), b.values(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.session.logits, full.logits, atol=1e-4, rtol=1e-4)


def test_no_edges_is_parallel_encoding_with_shared_positions(model):
    """graph='none': every chunk keeps its standalone cache at position 0; the question reads them all."""
    segs = segments(4)
    out = mpckv.Engine(model).prefill_segments(segs, "graphkv", graph="none")
    prompt = out.prompt
    assert prompt.positions[: sum(LENS)].tolist() == [i for n in LENS for i in range(n)]
    assert prompt.positions[sum(LENS) :].tolist() == list(range(max(LENS), max(LENS) + Q))
    off = 0
    for seg in segs[:-1]:
        k, v = compute_chunk(model, seg.token_ids)
        n = len(seg.token_ids)
        for layer, lc in enumerate(out.session.cache.layers):
            torch.testing.assert_close(lc.keys()[0][:, off : off + n], k[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lc.values()[0][:, off : off + n], v[layer], atol=1e-5, rtol=1e-5)
        off += n
    assert int(out.session.positions[0]) == max(LENS) + Q
    assert out.stats.recomputed_cached == 0


def test_source_order_does_not_change_targets(model):
    a, b, t, q = Chunk(rand_ids(12, 1)), Chunk(rand_ids(15, 2)), Chunk(rand_ids(10, 3)), Raw(rand_ids(4, 4))
    x = mpckv.Engine(model).prefill_segments([a, b, t, q], "graphkv", sources=2)
    y = mpckv.Engine(model).prefill_segments([b, a, t, q], "graphkv", sources=2)
    for la, lb in zip(x.session.cache.layers, y.session.cache.layers, strict=True):
        torch.testing.assert_close(la.keys()[0][:, 27:], lb.keys()[0][:, 27:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(la.values()[0][:, 27:], lb.values()[0][:, 27:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.session.logits, y.session.logits, atol=1e-5, rtol=1e-5)
    # sources keep their round-0 cache; max position = P + L_src + L_tgt + n_q - 1
    assert int(x.prompt.positions.max()) == 15 + 10 + 4 - 1
    k0, _ = compute_chunk(model, a.token_ids)
    torch.testing.assert_close(x.session.cache[2].keys()[0][:, :12], k0[2], atol=1e-5, rtol=1e-5)


def test_mask_matches_naive_rule(model):
    segs = segments(5)
    meth = GraphKV(graph="bipartite", sources=1)
    out = mpckv.Engine(model).prefill_segments(segs, meth)
    roles = out.prompt.extras["graphkv_roles"]
    assert roles == ["source", "target", "target", "raw"]
    allow = meth.allowed(out.prompt.segment_ids, roles)
    seg = out.prompt.segment_ids.tolist()
    for i in range(len(seg)):
        for j in range(len(seg)):
            a, b = seg[i], seg[j]
            want = (
                (a == b and j <= i)
                or (roles[a] == "raw" and b < a)
                or (roles[a] == "target" and roles[b] == "source")
            )
            assert bool(allow[i, j]) == want
    with pytest.raises(ConfigError, match="graph"):
        GraphKV(graph="ring")
    with pytest.raises(ConfigError, match="raw segments"):
        mpckv.Engine(model).prefill_segments([segs[0], Raw([1, 2]), segs[1], segs[3]], "graphkv")


def test_leading_raw_prefix_positions(model):
    """A BOS-like raw prefix keeps positions 0..P-1; sources start at P, targets at P + L_src."""
    segs = [Raw([1]), *segments(6)]
    out = mpckv.Engine(model).prefill_segments(segs, "graphkv", sources=1)
    pos = out.prompt.positions.tolist()
    assert pos[0] == 0 and pos[1] == 1  # the source
    assert pos[1 + LENS[0]] == 1 + LENS[0] and pos[1 + LENS[0] + LENS[1]] == 1 + LENS[0]  # both targets
    assert int(out.prompt.positions.max()) == 1 + LENS[0] + max(LENS[1:]) + Q - 1
    assert torch.isfinite(out.session.logits).all()
