"""A²ATS (He et al., ACL 2025 Findings): codebook calibration, encoding, LUT scores, retrieval — card
oracles against naive references."""

from __future__ import annotations

import pytest
import torch

from mpckv.calibrate import config_signature
from mpckv.calibrate.a2ats import (
    A2atsCalibration,
    calibrate,
    kmeans,
    load_codebooks,
    nearest,
    query_cholesky,
    save_codebooks,
)
from mpckv.errors import ConfigError
from mpckv.plaintext.engine import Engine
from mpckv.plaintext.methods.a2ats import A2ATS, code_groups, encode_keys, lookup_scores
from mpckv.plaintext.rope import rerotate
from mpckv.registry import get_method


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_nearest_is_the_naive_argmin_with_ties_to_the_lowest_index():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 4, generator=gen)
    book = torch.randn(2, 7, 4, generator=gen)
    book[:, 5] = book[:, 2]  # duplicate codeword: the lower index must win
    got = nearest(x, book, block=16)
    for h in range(2):
        for t in range(50):
            dist = [float((x[h, t] - book[h, c]).pow(2).sum()) for c in range(7)]
            assert dist[int(got[h, t])] == pytest.approx(min(dist), abs=1e-5)
            assert int(got[h, t]) != 5  # the twin of codeword 2 never wins


def test_query_weighted_distance_is_the_logit_error():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(40, 6, generator=gen)
    chol = query_cholesky(q, 0.0).double()
    diff = torch.randn(6, generator=gen).double()
    hq = q.double().T @ q.double()
    rms = hq.pow(2).mean().sqrt()
    lhs = (diff @ chol).pow(2).sum()
    rhs = (q.double() @ diff).pow(2).sum() / rms
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-8)


def test_identity_query_moment_is_plain_kmeans():
    """``Hq ∝ I`` ⇒ ``L ∝ I``: the codebook mapped back with ``L⁻¹`` is plain k-means (same seeds)."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(200, 4, generator=gen)
    q = torch.eye(4).repeat(3, 1)
    chol = query_cholesky(q, 0.0)
    weighted = kmeans(k @ chol, 8, 5, torch.Generator().manual_seed(9)) @ torch.linalg.inv(chol)
    plain = kmeans(k, 8, 5, torch.Generator().manual_seed(9))
    torch.testing.assert_close(weighted, plain, atol=1e-4, rtol=1e-4)


def test_encode_keys_and_lookup_scores_match_naive_references():
    gen = torch.Generator().manual_seed(3)
    b, hk, g, n, d, c = 1, 2, 2, 30, 4, 5
    k_pre = torch.randn(b, hk, n, d, generator=gen)
    book = torch.randn(hk, c, d, generator=gen)
    chol = torch.stack([query_cholesky(torch.randn(20, d, generator=gen), 1e-6) for _ in range(hk)])
    ids = encode_keys(k_pre, book, chol)
    for h in range(hk):
        for t in range(n):
            dist = ((k_pre[0, h, t] @ chol[h] - book[h]).pow(2)).sum(-1)
            assert int(ids[0, h, t]) == int(dist.argmin())
    cb = torch.randn(b, hk, c, d, generator=gen)
    q = torch.randn(b, hk * g, d, generator=gen)
    s = lookup_scores(q, cb.transpose(-1, -2), ids)
    for hq in range(hk * g):
        for t in range(n):
            want = float(q[0, hq] @ cb[0, hq // g, int(ids[0, hq // g, t])])
            assert float(s[0, hq // g, hq % g, t]) == pytest.approx(want, abs=1e-5)


def test_code_groups_counts_and_ranks():
    ids = torch.tensor([[[2, 0, 2, 1, 2, 0]]])
    ok = torch.tensor([[[True, True, True, True, False, True]]])
    counts, rank = code_groups(ids, ok, 3)
    assert counts.tolist() == [[[2, 1, 2]]]
    assert rank.tolist() == [[[0, 0, 1, 0, 6, 1]]]


def _engine_state(model, method, n=96, seed=4):
    eng = Engine(model, method)
    rec = eng.record_prefill([_prompt(n, seed)])
    s = eng.prefill_from(rec)
    return eng, rec, s


def test_exact_codebook_without_wrope_gives_exact_scores(tiny_random_model):
    """A codebook holding every key exactly (ids = token index) and true-position scoring ⇒ ``q·k/√d``."""
    m = A2ATS(budget=0.25, wrope=False, codebook="prompt")
    eng, rec, s = _engine_state(tiny_random_model, m)
    layer = 1
    st = s.states[layer]["a2"]
    b, hk, nc = st.ids.shape
    d = rec.keys[layer].shape[-1]
    k_post = torch.gather(rec.keys[layer].float(), 2, st.ctx_pos[..., None].expand(b, hk, nc, d))
    k_pre = rerotate(k_post, -st.ctx_pos, st.inv_freq)
    st.cb_t = k_pre.transpose(-1, -2).contiguous()  # codeword t = key t
    st.ids = torch.arange(nc).expand(b, hk, nc).to(torch.int16)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, tiny_random_model.config.num_attention_heads, k_pre.shape[-1], generator=gen)
    from mpckv.plaintext.methods.base import DecodeContext

    ctx = DecodeContext(
        layer, tiny_random_model.config, s.cache[layer], q, s.positions, 0, 0.3, s.states[layer]
    )
    got = m.token_scores(ctx, st)
    want = (q.view(b, hk, -1, q.shape[-1]) @ k_post.transpose(-1, -2)) * 0.3
    torch.testing.assert_close(
        got, want.masked_fill(~st.ctx_ok[:, :, None], float("-inf")), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("head_k", ["split", "budget"])
def test_retrieval_is_the_union_of_per_head_exact_topk(tiny_random_model, head_k):
    m = A2ATS(budget=0.3, sinks=2, window=4, head_k=head_k, codebook="prompt", prompt_codewords=16)
    eng, rec, s = _engine_state(tiny_random_model, m, n=120)
    from mpckv.plaintext.methods.base import DecodeContext

    layer = 2
    st = s.states[layer]["a2"]
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, tiny_random_model.config.num_attention_heads, rec.keys[0].shape[-1], generator=gen)
    ctx = DecodeContext(
        layer, tiny_random_model.config, s.cache[layer], q, s.positions, 0, 0.25, s.states[layer]
    )
    mask = m.retrieve(ctx, st)
    scores = m.token_scores(ctx, st)  # [B, Hk, G, Nc]
    hk, g = scores.shape[1], scores.shape[2]
    for h in range(hk):
        k = int(st.k_rows[0, h])
        union: set[int] = set()
        for j in range(g):
            sc = scores[0, h, j]
            top = set(torch.topk(sc, k).indices.tolist())
            # same multiset of values as the exact top-k (ties inside a codeword: any choice is a top-k)
            chosen = sorted(sc[list(top)].tolist())
            assert chosen == pytest.approx(sorted(torch.topk(sc, k).values.tolist()))
            union |= top
        got = set(mask[0, h].nonzero().flatten().tolist())
        assert len(got) >= k and len(got) <= g * k
        if head_k == "split":  # the union never exceeds the retrieval budget
            assert len(got) <= g * k
        got_vals = [sorted(scores[0, h, j, list(got)].tolist(), reverse=True)[:k] for j in range(g)]
        for j in range(g):  # each member head's top-k values are inside the union
            assert got_vals[j] == pytest.approx(torch.topk(scores[0, h, j], k).values.tolist())
    # sinks and window stay in the hot cache
    lc = s.cache[layer]
    hot = set(lc.pos[0, 0, : int(lc.lengths[0, 0])].tolist())
    assert {0, 1} <= hot and set(range(116, 120)) <= hot


def test_everything_retrieved_equals_dense(tiny_random_model):
    """The gather path over a complete retrieval is dense attention (reference masked == gathered)."""
    p = [_prompt(80, 7)]
    m = A2ATS(budget=0.3, codebook="prompt", prompt_codewords=8)
    eng = Engine(tiny_random_model, m)
    s = eng.prefill(p)
    for st in s.states:
        if st["a2"] is not None:
            st["a2"].k_rows.fill_(10_000)
    dense = Engine(tiny_random_model)
    ds = dense.prefill(p)
    for _ in range(4):
        tok = ds.logits.argmax(-1)
        torch.testing.assert_close(eng.decode(s, tok), dense.decode(ds, tok), atol=1e-4, rtol=1e-4)
        st = s.states[1]["a2"]
        assert st.store.step_bytes[-1] == 2 * int(st.ctx_ok.sum()) * st.store.unit_bytes("k")


def test_calibration_file_roundtrip_and_auto_lookup(tiny_random_model, tmp_path):
    cal = A2atsCalibration(codewords=8, seq_len=128, sequences=2, iters=2)
    tensors, meta = calibrate(tiny_random_model, cal, "test")
    path = tmp_path / "cb.safetensors"
    save_codebooks(tensors, meta, path)
    cfg = tiny_random_model.config
    books, w = load_codebooks(path, config_signature(cfg))
    assert len(books) == cfg.num_hidden_layers and books[0][0].shape == (
        cfg.num_key_value_heads,
        8,
        cfg.head_dim,
    )
    assert w == min(2048, cfg.max_position_embeddings // 4)
    other = dict(config_signature(cfg), num_hidden_layers=99)
    with pytest.raises(ConfigError):
        load_codebooks(path, other)
    m = A2ATS(budget=0.3, codebook=str(path))
    res = Engine(tiny_random_model, m).generate([_prompt(90)], 3, stop_tokens=[])
    assert len(res.tokens[0]) == 3
    with pytest.raises(ConfigError, match="not found"):
        A2ATS(codebook=str(tmp_path / "missing.safetensors")).books(cfg)


def test_shipped_tiny_codebook_is_found():
    from mpckv.checkpoint import load_model

    model = load_model("tiny")
    found = get_method("a2ats").books(model.config)
    assert found is not None and found[1] == 1024


def test_cli_calibrate_a2ats(tmp_path, capsys):
    import json

    from mpckv.cli import main

    out = tmp_path / "a2.safetensors"
    args = ["calibrate", "a2ats", "--model", "tiny", "--out", str(out), "--codewords", "4"]
    args += ["--calib-tokens", "256", "--calib-seq-len", "128", "--iters", "1", "--offset", "64"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["offset"] == 64 and info["codewords"] == 4
    from mpckv.calibrate.a2ats import read_meta

    assert read_meta(out)["calibration"]["sequences"] == 2
