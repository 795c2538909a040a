import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import mpckv.kernels
import mpckv.kernels.decode_attention as da
import mpckv.kernels.page_bounds as pb
import mpckv.kernels.window_scores as ws
from mpckv.kernels._common import is_interpreted, resolve_impl


def _small_inputs():
    q_win = torch.randn(1, 2, 3, 16)
    q = torch.randn(1, 2, 16)
    k = torch.randn(1, 1, 9, 16)
    lengths = torch.tensor([[6]])
    q_pos = torch.tensor([[3, 4, 5]])
    return q_win, q, k, lengths, q_pos


def _boom(*args, **kwargs):
    raise AssertionError("the triton path must not be taken for CPU inputs with impl='auto'")


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setattr(ws, "_window_column_scores_triton", _boom)
    monkeypatch.setattr(da, "_decode_attention_triton", _boom)
    q_win, q, k, lengths, q_pos = _small_inputs()
    s = ws.window_column_scores(q_win, k, lengths, q_pos, scale=0.25)
    assert s.shape == (1, 1, 9)
    out, probs = da.decode_attention(q, k, k, lengths, scale=0.25, return_probs=True)
    assert out.shape == (1, 2, 16) and probs is not None
    kmin, kmax = pb.page_minmax(k, lengths, 4)
    u = pb.page_upper_bound(q, kmin, kmax, pb.num_valid_pages(lengths, 4))
    assert u.shape == (1, 1, 3) and u[0, 0, 2] == float("-inf")


def test_resolve_impl_rules():
    cpu = (torch.zeros(1),)
    assert resolve_impl("torch", cpu, None) == "torch"
    assert resolve_impl("auto", cpu, None) == "torch"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", cpu, None)
    if mpckv.kernels.HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve_impl("triton", cpu, object())  # a compiled (non-interpreted) kernel on CPU tensors
        if is_interpreted(ws._win_lse_kernel):
            assert resolve_impl("triton", cpu, ws._win_lse_kernel) == "triton"


def test_imports_and_works_without_triton(monkeypatch):
    """Load a second copy of the package with ``import triton`` failing."""
    kdir = Path(mpckv.kernels.__file__).parent
    name = "_mpckv_kernels_without_triton"
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    init = kdir / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(kdir)])
    assert spec is not None and spec.loader is not None
    pkg = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, pkg)
    try:
        spec.loader.exec_module(pkg)
        assert pkg.HAS_TRITON is False
        names = ("window_scores", "page_bounds", "decode_attention")
        mods = {m: importlib.import_module(f"{name}.{m}") for m in names}
        q_win, q, k, lengths, q_pos = _small_inputs()
        ref = ws.window_column_scores(q_win, k, lengths, q_pos, scale=0.25, impl="torch")
        got = mods["window_scores"].window_column_scores(q_win, k, lengths, q_pos, scale=0.25)
        torch.testing.assert_close(got, ref)
        with pytest.raises(RuntimeError, match="triton"):
            mods["window_scores"].window_column_scores(q_win, k, lengths, q_pos, scale=0.25, impl="triton")
        with pytest.raises(RuntimeError, match="triton"):
            mods["page_bounds"].page_minmax(k, lengths, 4, impl="triton")
        with pytest.raises(RuntimeError, match="triton"):
            mods["decode_attention"].decode_attention(q, k, k, lengths, scale=0.25, impl="triton")
        out, _ = mods["decode_attention"].decode_attention(q, k, k, lengths, scale=0.25)
        assert out.shape == (1, 2, 16)
    finally:
        for mod in [m for m in sys.modules if m.startswith(name + ".")]:
            del sys.modules[mod]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_cache_and_empty_window(impl):
    if impl == "triton" and not (mpckv.kernels.HAS_TRITON and is_interpreted(ws._win_lse_kernel)):
        pytest.skip("needs the Triton interpreter")
    q_win, q, k, lengths, q_pos = _small_inputs()
    k0 = k[:, :, :0]
    s = ws.window_column_scores(q_win, k0, lengths, q_pos, scale=1.0, impl=impl)
    assert s.shape == (1, 1, 0)
    s = ws.window_column_scores(q_win[:, :, :0], k, lengths, q_pos[:, :0], scale=1.0, impl=impl)
    assert s.shape == (1, 1, 9) and bool((s == 0).all())
    out, probs = da.decode_attention(q, k0, k0, lengths, scale=1.0, return_probs=True, impl=impl)
    assert bool((out == 0).all()) and probs is not None and probs.shape == (1, 2, 0)
    kmin, kmax = pb.page_minmax(k0, lengths, 4, impl=impl)
    assert kmin.shape == (1, 1, 0, 16)
    assert pb.page_upper_bound(q, kmin, kmax, lengths, impl=impl).shape == (1, 1, 0)
