"""The run layer's one user-error type, and the type check of a run's keyword arguments."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable

from fastdiff.config import ConfigError, check_types


class RunError(ConfigError):
    """A run that cannot go ahead as asked (its options, files, folder or ranks); the message is
    one line the user can act on. A ConfigError, so ``except ConfigError`` catches every setting
    a user got wrong; anything else raised by a run is a bug and keeps its traceback."""


@functools.cache
def _arguments_of(fn: Callable) -> type:
    """``fn``'s arguments with plain annotated types (int, str | Path | None, ...) as a dataclass,
    so they are checked as a typed config's fields are (callbacks are left out; Python 3.10 counts
    a parameterized ``Callable[...]`` as a type, so a plain type is also one with no origin)."""
    hints = typing.get_type_hints(fn)
    fields = [
        (name, hint)
        for name, hint in hints.items()
        if name != "return"
        and typing.get_origin(hint) in (None, typing.Union, types.UnionType)
        and all(isinstance(a, type) and not typing.get_origin(a) for a in typing.get_args(hint) or (hint,))
    ]
    return dataclasses.make_dataclass(f"{fn.__name__}_arguments", fields)


@functools.cache
def _callbacks_of(fn: Callable) -> tuple[str, ...]:
    """``fn``'s arguments annotated as callables (``Callable[...]`` or ``Callable[...] | None``)."""
    hints = typing.get_type_hints(fn)
    return tuple(
        name
        for name, hint in hints.items()
        if any(typing.get_origin(h) is Callable for h in (hint, *typing.get_args(hint)))
    )


def check_arguments(fn: Callable, arguments: dict) -> None:
    """A RunError naming the first of ``fn``'s arguments (a Python caller's keywords, ``locals()``
    at its start) whose value is not of its annotated type, before it fails deep inside a run
    (a callback that cannot be called, only when the run first reports, after its work)."""
    cls = _arguments_of(fn)
    try:
        check_types(cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)}))
    except ConfigError as e:
        raise RunError(f"{fn.__name__}: {e}") from None
    for name in _callbacks_of(fn):
        value = arguments[name]
        if value is not None and not callable(value):
            raise RunError(f"{fn.__name__}: {name} {value!r}: expected a callable or None")
