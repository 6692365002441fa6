"""Progress bars that suit where stderr goes.

A terminal gets tqdm's live bar. A file or pipe (a CI log, a scheduler's output file) keeps
every redraw, ten a second by tqdm's default: thousands of carriage-return lines an hour. There
a bar redraws every LOG_INTERVAL seconds instead (TQDM_MININTERVAL, tqdm's own setting, wins).
"""

from __future__ import annotations

import os
import sys

LOG_INTERVAL = 30.0  # seconds between a bar's redraws in a log


def writes_to_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, redrawn every LOG_INTERVAL seconds when its
    stream is no terminal."""
    from tqdm.auto import tqdm

    if not writes_to_terminal(kwargs.get("file") or sys.stderr) and "TQDM_MININTERVAL" not in os.environ:
        # maxinterval too: past it tqdm's monitor thread forces a redraw of a slow bar
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
