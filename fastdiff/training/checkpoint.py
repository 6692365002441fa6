"""Training-state checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint at step ``s`` in ``DIR`` is ``model_s.safetensors``, ``ema_<rate>_s.safetensors``
per EMA rate and ``state_s.pt`` (optimizer, loss scaler, sampler history, RNG states, config,
CPU threads; plain tensors/dicts only), then ``latest.json`` names them. Every file goes to a
temporary name and is renamed into place, and ``latest.json`` is renamed last, so a run killed at
any instant leaves the previous checkpoint intact and never a half-written file under a real name.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fastdiff.config import ConfigError
from fastdiff.files import LOCK, atomic_write, is_temp_file
from fastdiff.models.checkpoint import (
    CheckpointError,
    load_state_dict,
    read_checkpoint,
    read_metadata,
    save_weights,
)

LATEST = "latest.json"
CHECKPOINT_FILE = re.compile(r"(model|state|ema_.+)_(\d{7})\.(safetensors|pt)")
# The run's other files in its --out: the log, its plot, and the preview grids' folder.
LOG, LOSS_PLOT, SAMPLES = "log.jsonl", "loss.png", "samples"
SAMPLE_GRID = re.compile(r"step_(\d{7})\.png")
_RUN_FILES = (LATEST, LOG, LOSS_PLOT, LOCK)
# The command that continues a run of each kind (the model files' "kind" metadata).
COMMANDS = {"diffusion": "fastdiff train", "classifier": "fastdiff train-classifier"}


class _KeptWriteError:
    """A file whose failed write keeps its OSError: torch's zip writer raises a RuntimeError in
    its place ('[enforce fail at inline_container.cc:672] . unexpected pos 3135744 vs 3135632'
    for a full disk), a traceback that says nothing of the disk."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj, path) -> None:
    """torch.save to a temporary name renamed into place, the same bytes for the same values.

    torch names a zip's folder after the file it is given, so it gets an open file (its folder
    is then "archive", as in the original's files): the temporary name's random part went into
    every entry. And pickle writes a string met twice as the same object once, then by
    reference, so strings are interned first: a resumed run's optimizer state, read from a
    file, held its own copies of the names and was other bytes than an uninterrupted run's.
    """

    def write(tmp: str) -> None:
        try:
            with open(tmp, "wb") as f:
                sink = _KeptWriteError(f)
                try:
                    torch.save(_interned(obj), sink)
                except RuntimeError:
                    if sink.error is None:
                        raise
                    raise sink.error from None
        except OSError as e:  # a file object's error names no file: the one line names it
            raise OSError(e.errno, e.strerror, tmp) from None

    atomic_write(path, write)


def _interned(obj):
    """``obj`` with every string in its dicts, lists and tuples interned (the containers copied,
    with the attributes a state dict carries: its ``_metadata``, the modules' versions that
    load_state_dict reads; subclasses, which may not rebuild so, are kept as they are)."""
    kind = type(obj)
    if kind is str:
        return sys.intern(obj)
    if kind in (dict, OrderedDict):
        copy = kind((_interned(k), _interned(v)) for k, v in obj.items())
        if kind is OrderedDict:
            vars(copy).update(_interned(vars(obj)))
        return copy
    if kind in (list, tuple):
        return kind(_interned(v) for v in obj)
    return obj


def seed_rng(seed: int) -> None:
    """Seed every RNG a checkpoint captures (:func:`capture_rng`) from the run's seed: Python's
    and numpy's, left to the OS's entropy, made each run's state files other bytes."""
    random.seed(seed)
    np.random.seed([seed % 2**32, seed // 2**32])  # numpy's legacy seed takes 32-bit words
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Global RNG states as tensors/lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(pstate), "gauss": pgauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def ema_name(rate: float) -> str:
    """The shortest text that reads back as ``rate``: distinct rates never share a file."""
    return repr(float(rate))


def step_record(step: int, rates) -> dict:
    """The checkpoint record of ``step``: its files' names, an EMA's per rate (``ema_name``)."""
    return {
        "step": step,
        "model": f"model_{step:07d}.safetensors",
        "ema": {rate: f"ema_{rate}_{step:07d}.safetensors" for rate in rates},
        "state": f"state_{step:07d}.pt",
    }


def save_checkpoint(
    out_dir,
    step: int,
    model_state: dict,
    ema_states: dict[float, dict],
    state: dict,
    metadata: dict | None = None,
) -> dict:
    """Write one checkpoint and point ``latest.json`` at it; returns the pointer record."""
    out_dir = Path(out_dir)
    meta = dict(metadata or {}, step=step)
    record = step_record(step, [ema_name(rate) for rate in ema_states])
    named = _named_step(out_dir)
    written: list[Path] = []
    try:
        written.append(out_dir / record["model"])
        save_weights(model_state, written[-1], meta)
        for rate, ema in ema_states.items():
            written.append(out_dir / record["ema"][ema_name(rate)])
            save_weights(ema, written[-1], dict(meta, ema_rate=rate))
        written.append(out_dir / record["state"])
        save_torch(state, written[-1])
        atomic_write(out_dir / LATEST, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    except BaseException:
        # a write that failed (a full disk) leaves no part of its step: a first checkpoint's
        # parts, named by no latest.json, made the folder refuse both a rerun and --resume
        if named != step:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    return record


def _named_step(out_dir: Path) -> int | None:
    """The step latest.json names (None: none, or none readable), whose files stay whatever fails."""
    try:
        return json.loads((out_dir / LATEST).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_entries(out_dir) -> list[str]:
    """What ``out_dir`` holds that no training run writes (sorted; empty for a new folder or a
    run's, a killed one's included): a fresh run there would overwrite or mix with those files."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in sorted(out_dir.iterdir()):
        if p.name == SAMPLES and p.is_dir():
            found += [
                f"{SAMPLES}/{q.name}"
                for q in sorted(p.iterdir())
                if not (SAMPLE_GRID.fullmatch(q.name) or is_temp_file(q))
            ]
        elif not (p.name in _RUN_FILES or CHECKPOINT_FILE.fullmatch(p.name) or is_temp_file(p)):
            found.append(p.name)
    return found


def latest_checkpoint(out_dir) -> dict | None:
    """The checkpoint ``latest.json`` names, None in a folder without checkpoint files.

    Checkpoint files without ``latest.json`` are another run's (or a first checkpoint a kill cut
    short): refused, since training there would overwrite them and mix two runs."""
    out_dir = Path(out_dir)
    path = out_dir / LATEST
    if not path.is_file():
        found = (
            sorted(p.name for p in out_dir.iterdir() if CHECKPOINT_FILE.fullmatch(p.name))
            if out_dir.is_dir()
            else []
        )
        if found:
            raise CheckpointError(
                f"{out_dir} holds checkpoint files ({found[0]}{', ...' if len(found) > 1 else ''}) "
                f"but no {LATEST}, so no run to continue; choose another --out, or delete them"
            )
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 errors
        raise CheckpointError(f"cannot read {path}: {e} (cut short?)") from None
    if not _is_record(record):
        raise CheckpointError(f"{path} is not a checkpoint record (step, model, ema, state)")
    return record


def weights_files(out_dir, record: dict) -> str:
    """The weights a checkpoint record names, EMA first, as paths a sampling command takes: what a
    finished run points its user to (latest.json itself names no network)."""
    out_dir = Path(out_dir)
    names = [f"{out_dir / n} (EMA {rate})" for rate, n in record["ema"].items()]
    return " or ".join([*names, str(out_dir / record["model"])])


def _is_record(record) -> bool:
    """latest.json as save_checkpoint writes it; its file names are ours, so no other file is read."""
    if not (
        isinstance(record, dict)
        and isinstance(record.get("step"), int)
        and isinstance(record.get("ema"), dict)
    ):
        return False
    names = [record.get("model"), record.get("state"), *record["ema"].values()]
    return all(isinstance(n, str) and CHECKPOINT_FILE.fullmatch(n) for n in names)


def resumable_checkpoint(out_dir, kind: str, max_steps: int) -> dict | None:
    """The latest checkpoint (None: none yet) if a ``kind`` run to ``max_steps`` can continue it.
    Reads only small files, so the CLI asks before it reads data or builds a model."""
    record = latest_checkpoint(out_dir)
    if record is None:
        return None
    have = read_metadata(Path(out_dir) / record["model"]).get("kind", kind)
    if have != kind:
        raise CheckpointError(f"{out_dir} holds a {have} run; continue it with `{COMMANDS.get(have, have)}`")
    if record["step"] > max_steps:
        raise ConfigError(f"{out_dir} is already at step {record['step']}, past --max-steps {max_steps}")
    return record


def load_checkpoint(out_dir, record: dict | None = None):
    """-> (step, model_state, {rate_name: ema_state}, state) of ``record`` (default: the latest);
    a missing, cut-short or foreign file is one CheckpointError."""
    out_dir = Path(out_dir)
    record = record or latest_checkpoint(out_dir)
    if record is None:
        raise CheckpointError(f"no checkpoint ({LATEST}) in {out_dir}")
    model = load_state_dict(out_dir / record["model"])
    emas = {name: load_state_dict(out_dir / f) for name, f in record["ema"].items()}
    state = read_checkpoint(out_dir / record["state"])
    if not isinstance(state, dict) or state.get("step") != record["step"]:
        raise CheckpointError(
            f"{out_dir / record['state']} is not the training state of step {record['step']} ({LATEST})"
        )
    return record["step"], model, emas, state


def read_state_settings(path) -> dict | None:
    """A state file's ``config`` and ``data`` records, memory-mapped so that its optimizer tensors
    are not read; None where it cannot be read (resuming reads it fully and names the damage)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - any damage is reported by load_checkpoint, in one line
        return None
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        return None
    return {"config": state["config"], "data": state.get("data") or {}}


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (called after latest.json names the newest)."""
    files = [(p, m) for p in out.iterdir() if (m := CHECKPOINT_FILE.fullmatch(p.name))]
    steps = sorted({int(m[2]) for _, m in files}, reverse=True)
    for p, m in files:
        if int(m[2]) not in steps[:keep]:
            p.unlink(missing_ok=True)
