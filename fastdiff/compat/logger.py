"""guided-diffusion's ``logger`` (the OpenAI baselines logger): same functions, same files.

``configure()`` writes to ``OPENAI_LOGDIR`` (else ``$TMPDIR/openai-<date-time>``) in the formats
of ``OPENAI_LOG_FORMAT`` (stdout,log,csv on rank 0; ``OPENAI_LOG_FORMAT_MPI``, default log, with
a ``-rankNNN`` suffix on the others): log.txt, progress.csv, progress.json, laid out as the
original lays them out, so tools reading its run folders read these. The rank comes from
torchrun's RANK (or MPI's variables); ``comm`` means "average over the torch.distributed group".
TensorBoard output is not written (it needs TensorFlow).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

_CELL = 30  # widest key or value cell of the human table


class KVWriter:
    def writekvs(self, kvs: dict) -> None:
        raise NotImplementedError


class SeqWriter:
    def writeseq(self, seq) -> None:
        raise NotImplementedError


def _cell(text: str) -> str:
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


class HumanOutputFormat(KVWriter, SeqWriter):
    """Key-value tables and log lines, to a file name or an open text stream."""

    def __init__(self, filename_or_file):
        self.own_file = isinstance(filename_or_file, str)
        if self.own_file:
            self.file = open(filename_or_file, "w")  # noqa: SIM115 (kept open: a log stream)
        elif hasattr(filename_or_file, "write"):
            self.file = filename_or_file
        else:
            raise TypeError(f"expected a file name or a text stream, got {filename_or_file!r}")

    def writekvs(self, kvs: dict) -> None:
        cells = {}
        for key, value in sorted(kvs.items()):
            text = f"{float(value):<8.3g}" if hasattr(value, "__float__") else str(value)
            cells[_cell(key)] = _cell(text)
        if not cells:
            print("WARNING: tried to write empty key-value dict")
            return
        kw, vw = max(map(len, cells)), max(map(len, cells.values()))
        rule = "-" * (kw + vw + 7)
        ordered = sorted(cells.items(), key=lambda kv: kv[0].lower())
        rows = [f"| {k.ljust(kw)} | {v.ljust(vw)} |" for k, v in ordered]
        self.file.write("\n".join([rule, *rows, rule]) + "\n")
        self.file.flush()

    def writeseq(self, seq) -> None:
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dump (numpy / torch scalars as floats)."""

    def __init__(self, filename: str):
        self.file = open(filename, "w")  # noqa: SIM115 (kept open: a log stream)

    def writekvs(self, kvs: dict) -> None:
        for key, value in kvs.items():
            if hasattr(value, "dtype"):
                kvs[key] = float(value)
        self.file.write(json.dumps(kvs) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutputFormat(KVWriter):
    """progress.csv: one row per dump; a new key widens the header and pads the rows so far
    (that rewrite goes to a temporary name renamed over the file, so a crash leaves one whole)."""

    def __init__(self, filename: str):
        self.path = filename
        self.keys: list[str] = []
        self.file = open(filename, "w")  # noqa: SIM115 (kept open: a log stream)

    def _widen(self, new_keys: list[str]) -> None:
        self.file.close()
        with open(self.path) as f:
            rows = f.read().splitlines()[1:]
        self.keys.extend(new_keys)
        temp = f"{self.path}.tmp-{os.getpid()}"
        with open(temp, "w") as f:  # open() honours the umask (mkstemp would not)
            f.write(",".join(self.keys) + "\n")
            for row in rows:
                f.write(row + "," * len(new_keys) + "\n")
        os.replace(temp, self.path)
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open: a log stream)

    def writekvs(self, kvs: dict) -> None:
        new_keys = sorted(set(kvs) - set(self.keys))
        if new_keys:
            self._widen(new_keys)
        self.file.write(",".join("" if kvs.get(k) is None else str(kvs[k]) for k in self.keys) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def make_output_format(format: str, ev_dir: str, log_suffix: str = ""):
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    files = {"log": ("log", "txt", HumanOutputFormat), "json": ("progress", "json", JSONOutputFormat)}
    files["csv"] = ("progress", "csv", CSVOutputFormat)
    if format in files:
        stem, ext, cls = files[format]
        return cls(os.path.join(ev_dir, f"{stem}{log_suffix}.{ext}"))
    if format == "tensorboard":
        raise ValueError("log format 'tensorboard' needs TensorFlow, which fastdiff's logger does not use")
    raise ValueError(f"unknown log format {format!r}; choose from stdout, log, json, csv")


# ================================================================ the functions scripts call


def logkv(key, val) -> None:
    """Record a diagnostic for this iteration (the last value wins)."""
    get_current().logkv(key, val)


def logkv_mean(key, val) -> None:
    """Record a diagnostic averaged over this iteration's calls."""
    get_current().logkv_mean(key, val)


def logkvs(d: dict) -> None:
    for key, val in d.items():
        logkv(key, val)


def dumpkvs() -> dict:
    """Write this iteration's diagnostics and start the next; returns what was written."""
    return get_current().dumpkvs()


def getkvs() -> dict:
    return get_current().name2val


def log(*args, level: int = INFO) -> None:
    """Write the args (space separated) to stdout and the log file, if at or above the level."""
    get_current().log(*args, level=level)


def debug(*args) -> None:
    log(*args, level=DEBUG)


def info(*args) -> None:
    log(*args, level=INFO)


def warn(*args) -> None:
    log(*args, level=WARN)


def error(*args) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    get_current().set_level(level)


def set_comm(comm) -> None:
    get_current().set_comm(comm)


def get_dir() -> str | None:
    """The folder being logged to (where the sampling scripts write their npz)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename: str):
    """Add the block's wall time to the diagnostic ``wait_<scopename>``."""
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val["wait_" + scopename] += time.time() - start


def profile(n: str):
    """Decorator form of :func:`profile_kv`."""

    def decorate(func):
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorate


# ================================================================ backend


def get_current() -> Logger:
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger:
    DEFAULT: Logger | None = None  # the logger made on first use without configure()
    CURRENT: Logger | None = None  # the one the module functions write to

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val) -> None:
        self.name2val[key] = val

    def logkv_mean(self, key, val) -> None:
        total, count = self.name2val[key] * self.name2cnt[key], self.name2cnt[key]
        self.name2val[key] = (total + val) / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self) -> dict:
        values = self.name2val
        if self.comm is not None:
            values = mpi_weighted_mean(
                self.comm, {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()}
            )
            if _rank() != 0:
                values["dummy"] = 1  # so other ranks do not warn about an empty table
        written = dict(values)
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(values)
        self.name2val.clear()
        self.name2cnt.clear()
        return written

    def log(self, *args, level: int = INFO) -> None:
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(map(str, args))

    def set_level(self, level: int) -> None:
        self.level = level

    def set_comm(self, comm) -> None:
        self.comm = comm

    def get_dir(self) -> str | None:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


def get_rank_without_mpi_import() -> int:
    """This process's rank from the launcher's variables (torchrun's RANK, or MPI's), else 0."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else get_rank_without_mpi_import()


def mpi_weighted_mean(comm, local_name2valcount: dict) -> dict:
    """On rank 0, each key's count-weighted mean over the ranks of {key: (value, count)}; {} on
    the others. The ranks are torch.distributed's (``comm`` only says to average)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local_name2valcount)
    else:
        everyone = [local_name2valcount]
    if _rank() != 0:
        return {}
    sums, counts = defaultdict(float), defaultdict(float)
    for name2valcount in everyone:
        for name, (val, count) in name2valcount.items():
            try:
                val = float(val)
            except ValueError:
                print(f"WARNING: tried to compute mean on non-float {name}={val}", file=sys.stderr)
                continue
            sums[name] += val * count
            counts[name] += count
    return {name: sums[name] / counts[name] for name in sums}


def configure(dir=None, format_strs=None, comm=None, log_suffix: str = "") -> None:
    """Log to ``dir`` (else OPENAI_LOGDIR, else a new $TMPDIR/openai-<date-time> folder)."""
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
    if not isinstance(dir, str):
        raise TypeError(f"the log folder must be a str, got {type(dir).__name__}")
    dir = os.path.expanduser(dir)
    os.makedirs(dir, exist_ok=True)
    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs if f]
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def _configure_default_logger() -> None:
    configure()
    Logger.DEFAULT = Logger.CURRENT


def reset() -> None:
    """Close the configured logger and go back to the default one."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log to ``dir`` inside the block, then to the previous logger again."""
    previous = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
