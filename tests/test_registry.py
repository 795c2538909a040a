from __future__ import annotations

import dataclasses

import pytest

import mpckv
from mpckv import ConfigError, KVMethod, UnknownMethodError
from mpckv import registry as reg


def test_list_methods_has_metadata():
    infos = {m.name: m for m in mpckv.list_methods()}
    assert infos["streamingllm"].family == "eviction"
    assert "2309.17453" in infos["streamingllm"].paper
    assert all(m.summary for m in infos.values())


def test_unknown_method_lists_available():
    with pytest.raises(UnknownMethodError) as exc:
        mpckv.get_method("snapkvv")
    assert "available" in str(exc.value) and "dense" in str(exc.value)


def test_unknown_parameter():
    with pytest.raises(ConfigError, match="no parameter"):
        mpckv.get_method("streamingllm", windw=3)


def test_duplicate_and_bad_names():
    with pytest.raises(ConfigError):
        reg.register_method("Bad+Name")

    @dataclasses.dataclass(kw_only=True)
    class Other(KVMethod):
        """x"""

    with pytest.raises(ConfigError, match="already registered"):
        reg.register_method("dense")(Other)


def test_entry_point_plugins(monkeypatch):
    @dataclasses.dataclass(kw_only=True)
    class Plugin(KVMethod):
        """A plugin method."""

        family = "eviction"

    class EP:
        name, value = "myplugin", "pkg:Plugin"

        def load(self):
            return Plugin

    monkeypatch.setattr(reg, "_loaded_plugins", False)
    monkeypatch.setattr(reg, "entry_points", lambda group: [EP()] if group == "mpckv.methods" else [])
    monkeypatch.setitem(reg._REGISTRY, "__sentinel__", Plugin)  # restored by monkeypatch
    try:
        assert isinstance(mpckv.get_method("myplugin"), Plugin)
        assert "myplugin" in [m.name for m in mpckv.list_methods()]
    finally:
        reg._REGISTRY.pop("myplugin", None)


def test_composition_multiplies_kept_fraction(tiny_random_model):
    import torch

    p = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    comp = mpckv.get_method("streamingllm+streamingllm", budget=0.5, sinks=2)
    assert comp.label == "streamingllm+streamingllm"
    res = mpckv.Engine(tiny_random_model, comp).generate([p], 1, stop_tokens=[])
    # each part keeps half of what it sees: 64 → 32 → 16
    assert res.stats.kept_per_layer[0] == 16.0
    assert res.stats.kept_fraction == pytest.approx(0.25)
