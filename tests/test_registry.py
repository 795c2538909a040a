from __future__ import annotations

import dataclasses
import re
from typing import Literal

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


# ------------------------------------------------------- one validation of hyper-parameters (issue 16)
def test_every_method_lists_only_real_hyper_parameters():
    from dataclasses import fields

    from mpckv.registry import method_class, method_parameters

    for info in mpckv.list_methods():
        cls = method_class(info.name)
        params = method_parameters(cls)
        assert params == [f.name for f in fields(cls) if f.init and not f.name.startswith("_")]
        assert "budget" in params
        for meta in ("name", "family", "paper", "secure", "needs_decode_probs", "default_budget"):
            assert meta not in params, (info.name, meta)


def test_every_method_validates_every_int_field_by_type():
    """A string for any int / float / bool field of any registered method is a one-line ConfigError."""
    import typing
    from dataclasses import fields

    from mpckv.registry import method_class

    checked = 0
    for info in mpckv.list_methods():
        cls = method_class(info.name)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.init and hints.get(f.name) in (int, float, bool):
                with pytest.raises(ConfigError, match=f"method '{info.name}': {f.name} must be "):
                    mpckv.get_method(info.name, **{f.name: "not-a-number"})
                checked += 1
    assert checked >= 10


def test_a_future_method_is_validated_without_code_of_its_own():
    from dataclasses import dataclass, field

    from mpckv.plaintext.methods.base import KVMethod
    from mpckv.registry import _REGISTRY, register_method

    @register_method("future_test_method")
    @dataclass(kw_only=True)
    class Future(KVMethod):
        """A method written tomorrow."""

        width: int = field(default=4, metadata={"min": 2, "max": 8})
        ratio: float = 0.5
        mode: Literal["a", "b"] = "a"
        layers: tuple[int, ...] = (0,)
        cap: int | None = None
        flag: bool = False

        family = "eviction"

    try:
        m = mpckv.get_method("future_test_method", ratio=1, layers=[1, 2], cap=None)
        assert m.ratio == 1.0 and isinstance(m.ratio, float) and m.layers == (1, 2)
        bad = [
            ({"width": 1}, "width must be an integer in [2, 8], got 1"),
            ({"width": 9}, "width must be an integer in [2, 8], got 9"),
            ({"width": 2.0}, "width must be an integer in [2, 8], got 2.0"),
            ({"ratio": "x"}, "ratio must be a number, got 'x'"),
            ({"ratio": float("inf")}, "ratio must be a number, got inf"),
            ({"mode": "c"}, "mode must be one of 'a', 'b', got 'c'"),
            ({"layers": [1, "2"]}, "layers must be a list of integers"),
            ({"cap": "3"}, "cap must be an integer or null, got '3'"),
            ({"flag": 1}, "flag must be true or false, got 1"),
        ]
        for kwargs, message in bad:
            with pytest.raises(ConfigError, match=re.escape(f"method 'future_test_method': {message}")):
                mpckv.get_method("future_test_method", **kwargs)
        with pytest.raises(ConfigError, match=r"it takes \['budget', 'cap', 'flag', 'layers', 'mode'"):
            mpckv.get_method("future_test_method", family="x")
    finally:
        _REGISTRY.pop("future_test_method", None)


def test_every_part_of_a_composition_is_validated():
    with pytest.raises(ConfigError, match="method 'quest': page_size must be an integer"):
        mpckv.get_method("streamingllm+quest", page_size="big")
    message = "no part of 'streamingllm+quest' takes parameter(s) ['family']"
    with pytest.raises(ConfigError, match=re.escape(message)):
        mpckv.get_method("streamingllm+quest", family="x")
