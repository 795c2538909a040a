"""One validation of KV-method hyper-parameters, derived from each method's dataclass fields.

Every method is a ``@dataclass(kw_only=True)`` subclass of :class:`~mpckv.plaintext.methods.base.KVMethod`.
Its hyper-parameters are its ``init`` dataclass fields (class variables such as ``name``, ``family``,
``paper`` or ``secure`` are metadata, not parameters). :func:`validate_params` checks every field's value
against its type annotation and the ranges the field declares in its metadata, so that a method written
tomorrow is validated without code of its own:

* ``int`` — an integer (not a bool),
* ``float`` — a number (ints become floats; not a bool, finite),
* ``bool`` — ``True`` or ``False`` only,
* ``str`` — a string,
* ``Literal[...]`` — one of the listed values,
* ``X | None`` / ``Optional[X]`` — ``None`` or an ``X``,
* ``tuple[T, ...]`` / ``list[T]`` — a list or tuple of ``T`` (stored as the annotated container),
* unions — the first alternative that accepts the value,
* ``Any`` (and ``budget``, checked by :class:`mpckv.budget.Budget`) — not checked here.

Ranges are declared in field metadata::

    window: int = field(default=32, metadata={"min": 1})
    alpha: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})

Errors are one line: ``method 'snapkv': window must be an integer >= 1, got 2.5``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from mpckv.errors import ConfigError

__all__ = ["hyper_parameters", "validate_params", "describe_type"]

_UNCHECKED = ("budget",)  # validated by mpckv.budget.Budget


class _Reject(Exception):
    """Internal: the value does not fit the annotation."""


def hyper_parameters(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The real hyper-parameters of a method class: its ``init`` dataclass fields, in order.

    Class metadata (``ClassVar`` attributes such as ``name``, ``family``, ``paper``, ``secure``) and
    private fields (leading ``_``) are not included.
    """
    if not dataclasses.is_dataclass(cls):
        return {}
    found = _PARAMS.get(cls)
    if found is None:
        found = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
        _PARAMS[cls] = found
    return found


_PARAMS: dict[type, dict[str, dataclasses.Field[Any]]] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations (cached per class)."""
    found = _HINTS.get(cls)
    if found is None:
        found = _HINTS[cls] = _resolve(cls)
    return found


def _resolve(cls: type) -> dict[str, Any]:
    """Resolved annotations; a field whose annotation cannot be resolved is left unchecked."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        pass
    import sys

    names = {**vars(typing), **vars(sys.modules.get(cls.__module__, typing))}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = f.type
        if isinstance(tp, str):
            try:
                tp = eval(tp, names)  # noqa: S307 - the class's own annotation text
            except Exception:
                continue
        out[f.name] = tp
    return out


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def describe_type(tp: Any, meta: Any = None) -> str:
    """``int`` + ``{"min": 1}`` → ``"an integer >= 1"`` (the wording of the error messages)."""
    meta = meta or {}
    rng = ""
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        rng = f" in [{lo}, {hi}]"
    elif lo is not None:
        rng = f" >= {lo}"
    elif hi is not None:
        rng = f" <= {hi}"
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an integer{rng}"
    if tp is float:
        return f"a number{rng}"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = _union_args(tp)
    if args is not None:
        parts = [describe_type(a, meta) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        what = describe_type(inner[0], meta) if len(inner) == 1 else "values"
        return f"a list of {_plural(what)}"
    return getattr(tp, "__name__", str(tp))


def _plural(what: str) -> str:
    for art in ("an ", "a "):
        if what.startswith(art):
            noun, _, rest = what[len(art) :].partition(" ")
            return f"{noun}s {rest}".strip()
    return what


def _in_range(x: float, meta: Any) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise _Reject


def _coerce(tp: Any, value: Any, meta: Any) -> Any:
    """Return ``value`` as the annotated type, or raise :class:`_Reject`."""
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Reject
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Reject
        _in_range(value, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _Reject
        _in_range(value, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Reject
        return value
    if tp is type(None):
        if value is not None:
            raise _Reject
        return None
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise _Reject
        return value
    args = _union_args(tp)
    if args is not None:
        for alt in args:
            try:
                return _coerce(alt, value, meta)
            except _Reject:
                continue
        raise _Reject
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _Reject
        inner = typing.get_args(tp)
        if origin is tuple and inner and inner[-1] is not Ellipsis:  # fixed-length tuple[int, str]
            if len(inner) != len(value):
                raise _Reject
            items = [_coerce(t, v, meta) for t, v in zip(inner, value, strict=True)]
        else:
            elem = inner[0] if inner else Any
            items = [_coerce(elem, v, meta) for v in value]
        return tuple(items) if origin is tuple else list(items)
    if origin is not None:  # dict[...] and other generics: check the container only
        if not isinstance(value, origin):
            raise _Reject
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Reject
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def validate_params(method: Any) -> None:
    """Check (and normalise) every hyper-parameter of ``method`` in place.

    Raises
    ------
    ConfigError
        ``method 'NAME': FIELD must be DESCRIPTION, got VALUE`` for the first field that does not fit.
    """
    cls = type(method)
    hints = _hints(cls)
    label = getattr(method, "name", "") or cls.__name__
    for name, f in hyper_parameters(cls).items():
        if name in _UNCHECKED or name not in hints:
            continue
        value = getattr(method, name)
        try:
            new = _coerce(hints[name], value, f.metadata)
        except _Reject:
            raise ConfigError(
                f"method {label!r}: {name} must be {describe_type(hints[name], f.metadata)}, "
                f"got {_show(value)}"
            ) from None
        if new is not value:
            object.__setattr__(method, name, new)
