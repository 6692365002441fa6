"""The run layer's one user-error type."""

from fastdiff.config import ConfigError


class RunError(ConfigError):
    """A run that cannot go ahead as asked (its options, files, folder or ranks); the message is
    one line the user can act on. A ConfigError, so ``except ConfigError`` catches every setting
    a user got wrong; anything else raised by a run is a bug and keeps its traceback."""
