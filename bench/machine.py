"""What every CPU record (compare_original, compare_train, cpu_bound, cpu_winograd) says of the
machine and day it was made on: a number from another machine or release is another number; and
where each record is written."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path


def _cpu_name() -> str:
    """The model name /proc/cpuinfo gives (platform.processor() is empty on Linux), else the
    architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(**fields) -> dict:
    """The date, CPU, cores, torch and Python, then the record's own ``fields`` (threads, load).
    "cpu" names the model and the vector instructions torch's CPU kernels run on (AVX2 or AVX512),
    and whether oneDNN has bf16 instructions: 2-core machines of both kinds make these records."""
    import torch

    bf16 = ", bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ""
    return {
        "date": dt.date.today().isoformat(),
        "cpu": f"{_cpu_name()}, {platform.machine()} {torch.backends.cpu.get_cpu_capability()}{bf16}",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **fields,
    }


def write_record(out_dir: Path, name: str, record: dict, lines: list[str], tag: str = "") -> None:
    """``<date>-<name>[-<tag>]`` .json (``record``, its "machine" machine_info's) and .md (``lines``)
    in ``out_dir``; the markdown is printed as well. The name is kept whole (a tag "v1.2" was cut
    to "v1" by Path.with_suffix)."""
    stem = f"{record['machine']['date']}-{name}" + (f"-{tag}" if tag else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text, end="")
