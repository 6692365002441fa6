"""What every CPU record (compare_original, compare_train, cpu_bound, cpu_winograd) says of the
machine and day it was made on: a number from another machine or release is another number."""

from __future__ import annotations

import datetime as dt
import os
import platform


def machine_info(**fields) -> dict:
    """The date, CPU, cores, torch and Python, then the record's own ``fields`` (threads, load)."""
    import torch

    return {
        "date": dt.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **fields,
    }
