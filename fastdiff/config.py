"""What every typed config shares: the user-error type and a field type check; and the one
line a user error quotes of a library's message (``error_line``).

Configs are frozen dataclasses built from user input (flags, options, checkpoint metadata), so a
wrong type or range is the user's to fix: it raises ConfigError, which the CLI shows as one line.
A bare ValueError elsewhere is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A network, process or run setting that cannot work (one line at the CLI). ``usage``: an
    option's number outside the range any run takes, or a name not among its choices, what click's
    own checks would have refused, so the CLI exits 2 as for them (else 1)."""

    def __init__(self, message: str = "", *, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def closest(name: Any, choices: typing.Iterable[str]) -> str | None:
    """The choice ``name`` looks like a typo of ("ddmi" -> 'ddim'), or None: a prefix ("dpm"),
    then the same letters swapped, then difflib's nearest."""
    choices = list(choices)
    close = []
    if isinstance(name, str) and name:
        close = (
            [c for c in choices if c.startswith(name.lower())]
            or [c for c in choices if sorted(c) == sorted(name.lower())]
            or difflib.get_close_matches(name, choices, n=1)
        )
    return close[0] if close else None


def changed(name: str, was: Any, now: Any) -> str:
    """A setting a resume refuses, with the run's value and this command's where both are short
    (a network record is not): a user who typed --steps 3 read only that "respacing" differed,
    not that the run took 'ddim2'. Every command's resume refusal words its pairs so."""
    values = repr(was), repr(now)
    if max(map(len, values)) > 40:
        return name
    return f"{name} ({values[0]} in the run, {values[1]} now)"


def unknown_choice(kind: str, name: Any, choices: typing.Iterable[str]) -> str:
    """The message refusing ``name`` as a ``kind``: every choice, and the closest when it looks
    like a typo, so a notebook user need not look the names up."""
    choices = list(choices)
    close = closest(name, choices)
    hint = f"; did you mean {close!r}?" if close else ""
    return f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}{hint}"


def error_line(error: BaseException) -> str:
    """The first line of a library's error message (its type name when it has none): what a
    one-line user error quotes of torch's or numpy's often many-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value has the hinted type, value normalised: lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, normal = _fits(value, option)
            if ok:
                return True, normal
        return False, value
    if hint is type(None):
        return value is None, value
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False, value
        normal = []
        for v in value:
            ok, v = _fits(v, item)
            if not ok:
                return False, value
            normal.append(v)
        return True, tuple(normal)
    if hint is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if hint is float:
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
    """A union as ``str | None`` whichever way it was written (``Optional[str]``, or Python
    3.10's reading of a function's ``str | None = None``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, typing.get_args(hint)))
    text = str(hint) if typing.get_origin(hint) else hint.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A config class's resolved annotations: resolving them is most of a config's cost to build."""
    return typing.get_type_hints(cls)


def check_types(config: Any) -> None:
    """Raise ConfigError naming the first field whose value is not of its annotated type; lists
    become tuples and ints become floats where a float is annotated (the config is frozen)."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, normal = _fits(value, hints[f.name])
        if not ok:
            raise ConfigError(f"{f.name} {value!r}: expected {_type_name(hints[f.name])}")
        if normal is not value:
            object.__setattr__(config, f.name, normal)
