"""Training-state checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint at step ``s`` in ``DIR`` is ``model_s.safetensors``, ``ema_<rate>_s.safetensors``
per EMA rate and ``state_s.pt`` (optimizer, loss scaler, sampler history, RNG states, config;
plain tensors/dicts only), then ``latest.json`` names them. Every file goes to a temporary
name and is renamed into place, and ``latest.json`` is renamed last, so a run killed at any
instant leaves the previous checkpoint intact and never a half-written file under a real name.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from fastdiff.files import atomic_write
from fastdiff.models.checkpoint import save_weights

LATEST = "latest.json"


def save_torch(obj, path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    return f"{rate:g}"


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
    record = {
        "step": step,
        "model": f"model_{step:07d}.safetensors",
        "ema": {},
        "state": f"state_{step:07d}.pt",
    }
    save_weights(model_state, out_dir / record["model"], meta)
    for rate, ema in ema_states.items():
        name = f"ema_{ema_name(rate)}_{step:07d}.safetensors"
        save_weights(ema, out_dir / name, dict(meta, ema_rate=rate))
        record["ema"][ema_name(rate)] = name
    save_torch(state, out_dir / record["state"])
    atomic_write(out_dir / LATEST, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def latest_checkpoint(out_dir) -> dict | None:
    path = Path(out_dir) / LATEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_checkpoint(out_dir, record: dict | None = None):
    """-> (step, model_state, {rate_name: ema_state}, state) of ``record`` (default: the latest)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    record = record or latest_checkpoint(out_dir)
    if record is None:
        raise FileNotFoundError(f"no checkpoint ({LATEST}) in {out_dir}")
    model = load_file(out_dir / record["model"])
    emas = {name: load_file(out_dir / f) for name, f in record["ema"].items()}
    state = torch.load(out_dir / record["state"], weights_only=True, map_location="cpu")
    return record["step"], model, emas, state


CHECKPOINT_FILE = re.compile(r"(model|state|ema_.+)_(\d{7})\.(safetensors|pt)")


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (called after latest.json names the newest)."""
    files = [(p, m) for p in out.iterdir() if (m := CHECKPOINT_FILE.fullmatch(p.name))]
    steps = sorted({int(m[2]) for _, m in files}, reverse=True)
    for p, m in files:
        if int(m[2]) not in steps[:keep]:
            p.unlink(missing_ok=True)
