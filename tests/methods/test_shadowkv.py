"""ShadowKV (Sun et al., ICML 2025): low-rank keys, landmarks, outliers, offloaded values — card oracles."""

from __future__ import annotations

import pytest
import torch

from mpckv.errors import ConfigError
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.methods.shadowkv import ShadowKV, low_rank_keys, outlier_scores
from mpckv.plaintext.rope import inverse_frequencies, rerotate
from mpckv.plaintext.tiered_store import cold_bytes_per_step
from mpckv.registry import get_method


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_full_rank_reconstructs_pre_rope_keys_and_rope_gives_the_stored_keys(tiny_random_model):
    cfg = tiny_random_model.config
    gen = torch.Generator().manual_seed(0)
    b, hk, n, d = 2, cfg.num_key_value_heads, 40, cfg.head_dim
    k_post = torch.randn(b, hk, n, d, generator=gen)
    inv = inverse_frequencies(cfg.rope, d)
    pos = torch.arange(n).expand(b, hk, n)
    k_pre = rerotate(k_post, -pos, inv)
    valid = torch.ones(b, n, dtype=torch.bool)
    u, sv = low_rank_keys(k_pre, valid, hk * d)
    rebuilt = torch.einsum("bnr,bgrd->bgnd", u, sv)
    torch.testing.assert_close(rebuilt, k_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rerotate(rebuilt, pos, inv), k_post, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_low_rank_error_is_the_eckart_young_bound(rank):
    """``‖X − U·SV‖²_F`` equals the sum of the discarded squared singular values (the optimum)."""
    gen = torch.Generator().manual_seed(rank)
    b, hk, n, d = 1, 2, 30, 12
    x = torch.randn(b, hk, n, d, generator=gen, dtype=torch.float64).float()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 25:] = False  # padding rows do not count
    u, sv = low_rank_keys(x, valid, rank)
    flat = x[0, :, :25].permute(1, 0, 2).reshape(25, hk * d)
    rec = torch.einsum("nr,grd->ngd", u[0, :25], sv[0]).reshape(25, hk * d)
    err = (flat - rec).pow(2).sum()
    sig = torch.linalg.svdvals(flat.double())
    torch.testing.assert_close(err.double(), sig[rank:].pow(2).sum(), rtol=1e-3, atol=1e-4)


def test_outlier_scores_match_a_naive_min_cosine():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 24, 6, generator=gen)
    lm = keys.view(1, 2, 3, 8, 6).mean(3)
    got = outlier_scores(keys, lm, 8)
    for g in range(2):
        for j in range(3):
            cos = [
                float(torch.nn.functional.cosine_similarity(lm[0, g, j], keys[0, g, j * 8 + t], dim=0))
                for t in range(8)
            ]
            assert got[0, g, j].item() == pytest.approx(min(cos), abs=1e-5)


def _run(model, method, prompts, steps=5):
    eng = Engine(model, method)
    s = eng.prefill(prompts)
    out = []
    for _ in range(steps):
        tok = s.logits.argmax(-1)
        out.append(eng.decode(s, tok))
    return s, torch.stack(out)


def test_full_rank_and_every_chunk_selected_equals_dense(tiny_random_model):
    """r = Hk·d and S covering every non-outlier chunk ⇒ dense attention through the rebuild path."""
    cfg = tiny_random_model.config
    p = [_prompt(72, 2)]
    m = ShadowKV(budget=0.5, rank=cfg.num_key_value_heads * cfg.head_dim, min_chunks=100, local_chunks=1)
    s, got = _run(tiny_random_model, m, p)
    assert s.states[1]["skv"] is not None  # really compressed: the engine cache holds the hot part only
    assert s.cache[1].max_length < 72
    dense_s, want = _run(tiny_random_model, "dense", p)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_structure_landmarks_outliers_hot_set(tiny_random_model):
    m = ShadowKV(budget=24, chunk=4, local_chunks=1, outlier_ratio=0.34, rank=8)
    eng = Engine(tiny_random_model, m)
    rec = eng.record_prefill([_prompt(64, 3)])
    s = eng.prefill_from(rec)
    for layer, lc in enumerate(s.cache.layers):
        st = s.states[layer]["skv"]
        keys = rec.keys[layer].float()
        n_ch = st.land_ok.shape[-1]
        assert n_ch == 64 // 4 - 1
        torch.testing.assert_close(
            st.landmarks_t.transpose(-1, -2), keys[:, :, : n_ch * 4].reshape(1, 2, n_ch, 4, -1).mean(3)
        )
        n_out = round(0.34 * 24 / 4)
        m_cos = outlier_scores(keys[:, :, : n_ch * 4], st.landmarks_t.transpose(-1, -2), 4)
        for g in range(2):
            outl = sorted((~st.land_ok[0, g]).nonzero().flatten().tolist())
            ref = sorted(torch.sort(m_cos[0, g], stable=True).indices[:n_out].tolist())
            assert outl == ref
            hot = set(lc.pos[0, g, : int(lc.lengths[0, g])].tolist())
            want = {c * 4 + t for c in outl for t in range(4)} | set(range(n_ch * 4, 64))
            assert hot == want
        # K = (24 - tail 4 - outliers) // 4 chunks per step, disjoint from the outliers
        assert st.k_chunks.tolist() == [[(24 - 4 - n_out * 4) // 4] * 2]
    ctx_chunks = []
    for _ in range(3):
        eng.decode(s, s.logits.argmax(-1))
        st = s.states[1]["skv"]
        ids = st.slots.unit_ids.view(1, 2, -1)
        ctx_chunks.append(ids.clone())
        for g in range(2):
            sel = ids[0, g].tolist()
            assert len(set(sel)) == len(sel) == int(st.k_chunks[0, g])
            assert all(bool(st.land_ok[0, g, c]) for c in sel)


def test_temporal_cache_and_prefetch_do_not_change_the_output_and_bytes_are_counted(tiny_random_model):
    p = [_prompt(96, 5), _prompt(70, 6)]
    base = dict(budget=0.3, chunk=4, rank=16)
    s_fresh, fresh = _run(tiny_random_model, ShadowKV(**base, reuse=False), p, steps=6)
    s_reuse, reuse = _run(tiny_random_model, ShadowKV(**base), p, steps=6)
    s_pre, pre = _run(tiny_random_model, ShadowKV(**base, prefetch=2), p, steps=6)
    torch.testing.assert_close(reuse, fresh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre, fresh, atol=1e-5, rtol=1e-5)
    for layer, st_dict in enumerate(s_fresh.states):
        st = st_dict["skv"]
        unit = st.store.unit_bytes("v")
        valid_sel = int(st.k_chunks.sum())  # every valid selected chunk is fetched every step
        assert st.store.step_bytes == [valid_sel * unit] * 6, layer
        st_r = s_reuse.states[layer]["skv"]
        assert st_r.store.bytes_moved == st_r.rebuilt * unit <= st.store.bytes_moved
    moved = sum(st["skv"].store.bytes_moved for st in s_reuse.states)
    assert cold_bytes_per_step(s_reuse.states) == pytest.approx(moved / 6)


def test_registry_and_errors(tiny_random_model):
    m = get_method("shadowkv", budget=0.1, rank=4)
    assert isinstance(m, ShadowKV) and m.secure == "planned"
    with pytest.raises(ConfigError):
        get_method("shadowkv", chunk=0)
    # a per-head evicting method first breaks the shared layout ShadowKV needs
    eng = Engine(tiny_random_model, get_method("snapkv+shadowkv", budget=0.5))
    with pytest.raises(ConfigError, match="same tokens"):
        eng.prefill([_prompt(80, 1)])
