import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import mpckv.kernels.window_scores as ws
from mpckv.kernels._common import is_interpreted
from mpckv.kernels.window_scores import window_column_scores

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCES = ["mean", "sum", "max"]


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-4


def _need_triton() -> None:
    pytest.importorskip("triton")
    if not ws.HAS_TRITON or not is_interpreted(ws._win_lse_kernel):
        pytest.skip("mpckv.kernels was imported before TRITON_INTERPRET=1 was set")


def make_case(L: int, G: int, d: int, dtype: torch.dtype, w: int = 5, seed: int = 0):
    """B=2, Hk=2, different lengths per (b, hk) incl. 0, NaN garbage past the lengths, one padding row."""
    gen = torch.Generator().manual_seed(seed)
    B, Hk = 2, 2
    lengths = torch.tensor([[L, (L + 1) // 2], [max(L - 3, 1), 0]])
    q = torch.randn(B, Hk * G, w, d, generator=gen).to(dtype)
    k = torch.randn(B, Hk, L, d, generator=gen) * 1.5
    for b in range(B):
        for hk in range(Hk):
            k[b, hk, int(lengths[b, hk]) :] = float("nan")
    q_pos = torch.stack([torch.arange(int(lengths[b].max()) - w, int(lengths[b].max())) for b in range(B)])
    q_pos[1, 0] = -1
    return q, k.to(dtype), lengths, q_pos


def oracle(q_win, k, lengths, q_pos, scale, group_reduce):
    """Explicit loops over (b, h, window row), float64."""
    B, H, W, _ = q_win.shape
    Hk, L = k.shape[1], k.shape[2]
    G = H // Hk
    per_head = torch.zeros(B, H, L, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(W):
                pos = int(q_pos[b, i])
                n = min(int(lengths[b, h // G]), pos + 1, L) if pos >= 0 else 0
                if n <= 0:
                    continue
                s = k[b, h // G, :n].double() @ q_win[b, h, i].double() * scale
                per_head[b, h, :n] += torch.softmax(s, dim=0)
    grouped = per_head.view(B, Hk, G, L)
    if group_reduce == "mean":
        return grouped.mean(2)
    if group_reduce == "sum":
        return grouped.sum(2)
    return grouped.amax(2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 7, 33, 130])
def test_torch_matches_oracle(L, G, d, dtype):
    q, k, lengths, q_pos = make_case(L, G, d, dtype)
    for red in REDUCES:
        got = window_column_scores(q, k, lengths, q_pos, scale=d**-0.5, group_reduce=red, impl="torch")
        assert got.dtype == torch.float32 and got.shape == (2, 2, L)
        expect = oracle(q, k, lengths, q_pos, d**-0.5, red)
        torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)


# (L, G, d, dtype): every L, G, d and dtype appears, kept small for the interpreter.
TRITON_CASES = [
    (1, 1, 16, torch.float32),
    (1, 4, 32, torch.bfloat16),
    (7, 1, 32, torch.float16),
    (7, 2, 16, torch.float32),
    (33, 2, 32, torch.bfloat16),
    (33, 4, 16, torch.float32),
    (130, 1, 16, torch.bfloat16),
    (130, 2, 32, torch.float32),
    (130, 4, 32, torch.float16),
]


@pytest.mark.parametrize(("L", "G", "d", "dtype"), TRITON_CASES, ids=str)
def test_triton_matches_torch(L, G, d, dtype):
    _need_triton()
    q, k, lengths, q_pos = make_case(L, G, d, dtype)
    for red in REDUCES if G > 1 else ["mean"]:  # all reductions coincide for G = 1
        ref = window_column_scores(q, k, lengths, q_pos, scale=d**-0.5, group_reduce=red, impl="torch")
        got = window_column_scores(q, k, lengths, q_pos, scale=d**-0.5, group_reduce=red, impl="triton")
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=_tol(dtype), rtol=_tol(dtype))
        assert torch.equal(got == 0, ref == 0)


def test_triton_many_row_blocks_and_odd_d():
    """Window longer than one row block, several key blocks, d not a power of two."""
    _need_triton()
    q, k, lengths, q_pos = make_case(70, 2, 24, torch.float32, w=19, seed=3)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous layout
    ref = window_column_scores(q, k, lengths, q_pos, scale=0.3, impl="torch")
    got = ws._window_column_scores_triton(q, k, lengths, q_pos, 0.3, "mean", block_l=16, block_w=16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.double(), oracle(q, k, lengths, q_pos, 0.3, "mean"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_invariants(impl):
    if impl == "triton":
        _need_triton()
    L, G, w = 33, 2, 6
    q, k, lengths, q_pos = make_case(L, G, 16, torch.float32, w=w, seed=1)
    out = window_column_scores(q, k, lengths, q_pos, scale=0.25, group_reduce="sum", impl=impl)
    for b in range(2):
        for hk in range(2):
            n = int(lengths[b, hk])
            rows = [i for i in range(w) if q_pos[b, i] >= 0 and n > 0]
            # every row with a visible key is a probability distribution (mass 1 per query head)
            assert out[b, hk].sum().item() == pytest.approx(G * len(rows), rel=1e-5)
            reach = min(n, int(q_pos[b].max()) + 1)
            assert bool((out[b, hk, reach:] == 0).all())  # invalid / future keys score exactly 0
    # a padding row (negative position) changes nothing
    q2 = torch.cat([q, torch.randn_like(q[:, :, :1])], dim=2)
    pos2 = torch.cat([q_pos, torch.full((2, 1), -5)], dim=1)
    out2 = window_column_scores(q2, k, lengths, pos2, scale=0.25, group_reduce="sum", impl=impl)
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)


def test_validation_errors():
    q, k, lengths, q_pos = make_case(7, 2, 16, torch.float32)
    with pytest.raises(ValueError):
        window_column_scores(q, k, lengths, q_pos, scale=1.0, group_reduce="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        window_column_scores(q[:, :3], k, lengths, q_pos, scale=1.0)
    with pytest.raises(ValueError):
        window_column_scores(q, k.half(), lengths, q_pos, scale=1.0)
    with pytest.raises(ValueError):
        window_column_scores(q, k, lengths[:, :1], q_pos, scale=1.0)
    with pytest.raises(ValueError):
        window_column_scores(q, k, lengths, q_pos.float(), scale=1.0)
    with pytest.raises(ValueError):
        window_column_scores(q, k, lengths, q_pos, scale=1.0, impl="cuda")  # type: ignore[arg-type]
