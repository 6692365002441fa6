"""Path options that expand a leading ``~`` to the home folder.

A shell expands it only in a word of its own: ``--out=~/runs`` (bash leaves that tilde alone),
a quoted "~/runs", or an argument list a CI config or a script passes reached fastdiff as is, and
a folder literally named ``~`` was made in the working folder (or a file was not found).
"""

from __future__ import annotations

import os

import click


class UserPath(click.Path):
    """click.Path after ``~`` expansion (before its exists checks)."""

    def convert(self, value, param, ctx):
        return super().convert(os.path.expanduser(value) if isinstance(value, str) else value, param, ctx)


class UserText(click.ParamType):
    """A path or a name ('mnist', 'bundled', a seed) as text, a path's ``~`` expanded; a name has none."""

    name = "text"

    def convert(self, value, param, ctx):
        return os.path.expanduser(value) if isinstance(value, str) else value
