"""Method registry: ``@register_method("name")``, :func:`get_method`, :func:`list_methods`.

Built-in methods register when ``mpckv.plaintext.methods`` is imported. Other packages add methods through
the ``mpckv.methods`` entry-point group (``name = "package.module:Class"``); they are loaded lazily on the
first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from mpckv.errors import ConfigError, UnknownMethodError

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}
_loaded_plugins = False


@dataclass(frozen=True)
class MethodInfo:
    """What ``mpckv methods`` lists."""

    name: str
    family: str
    paper: str
    secure: str
    summary: str
    #: Why a method has no secure path yet (or what its secure path reveals); one line.
    secure_note: str = ""


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator adding a KV method under ``name`` (lower-case, unique)."""
    if not name or name != name.lower() or "+" in name:
        raise ConfigError(f"method names must be lower-case and contain no '+', got {name!r}")

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _ensure_loaded() -> None:
    global _loaded_plugins
    importlib.import_module("mpckv.plaintext.methods")
    if _loaded_plugins:
        return
    _loaded_plugins = True
    for ep in entry_points(group="mpckv.methods"):
        if ep.name in _REGISTRY:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break the library
            raise ConfigError(f"method plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        register_method(ep.name)(cls)


def method_class(name: str) -> type:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_parameters(cls: type) -> list[str]:
    """The hyper-parameters a method class takes (``init`` dataclass fields; class metadata excluded)."""
    from mpckv.plaintext.methods.params import hyper_parameters

    return list(hyper_parameters(cls))


def get_method(name: str, /, **params: Any) -> Any:
    """Instantiate a registered method. ``"a+b"`` composes methods (same ``params`` for each part
    unless a part does not take a parameter).

    Every value is checked against the method's field types and declared ranges
    (:mod:`mpckv.plaintext.methods.params`), for every part of a composition.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a method name must be a non-empty string, got {name!r}")
    parts = [p.strip() for p in name.split("+")]
    if len(parts) > 1:
        from mpckv.plaintext.methods.compose import Composed

        accepted = {f for p in parts for f in method_parameters(method_class(p))}
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ConfigError(
                f"no part of {name!r} takes parameter(s) {unknown}; they take {sorted(accepted)}"
            )
        return Composed([_build(p, params, lenient=True) for p in parts])
    return _build(parts[0], params, lenient=False)


def _build(name: str, params: dict[str, Any], lenient: bool) -> Any:
    cls = method_class(name)
    fields = method_parameters(cls)
    unknown = [k for k in params if k not in fields]
    if unknown and not lenient:
        raise ConfigError(f"method {name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
    try:
        return cls(**{k: v for k, v in params.items() if k in fields})
    except TypeError as exc:  # a plugin whose __init__ differs from its fields
        raise ConfigError(f"bad parameters for method {name!r}: {exc}") from exc


def list_methods() -> list[MethodInfo]:
    _ensure_loaded()
    out = []
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append(
            MethodInfo(
                name=name,
                family=getattr(cls, "family", "?"),
                paper=getattr(cls, "paper", ""),
                secure=getattr(cls, "secure", "no"),
                summary=doc[0] if doc else "",
                secure_note=_secure_note(cls),
            )
        )
    return out


_DEFAULT_NOTES = {
    "planned": "no secure path yet: its scores would run on shares, but the secure top-k / compaction "
    "for it is not written",
    "no": "has no secure path",
}


def _secure_note(cls: type) -> str:
    note = str(getattr(cls, "secure_note", "") or "")
    if note:
        return note
    return _DEFAULT_NOTES.get(str(getattr(cls, "secure", "no")), "")
