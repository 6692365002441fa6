"""The one line and exit status of a user error: 2 where the command line alone is wrong, as
click's usage errors, 1 where the files, the data or the machine make the run impossible."""

from __future__ import annotations

import click


def user_error(error: Exception) -> click.ClickException:
    """``error`` (a user error: a ConfigError, DataError, ...) as the command's one line; a value
    no option takes (``ConfigError(usage=True)``) exits 2, like click's own range check."""
    line = click.ClickException(str(error))
    if getattr(error, "usage", False):
        line.exit_code = 2
    return line
