"""Checkpoint I/O: guided-diffusion ``.pt`` files and safetensors, with errors that say what
does not fit and which preset would."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdiff.config import error_line

StateDict = dict[str, torch.Tensor]
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the networks the package ships
_SHOWN = 5  # keys listed per category in an error message
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def _is_state_dict(sd: Any) -> bool:
    return isinstance(sd, Mapping) and all(isinstance(v, torch.Tensor) for v in sd.values())


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state dict on the CPU: ``.safetensors`` via safetensors, anything else via
    ``torch.load(weights_only=True)`` (a top-level ``{"state_dict": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    sd = read_checkpoint(path)
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not _is_state_dict(sd):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


def check_torch_file(path: Path) -> None:
    """One CheckpointError unless ``path`` starts as torch.save's files do (a zip archive; older
    torch: a pickle): torch.load fails on anything else with a bare number or opcode that names
    nothing the user can act on, and a text file is no network to ask flags for."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a file torch.save wrote (nor .safetensors)"
        )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """What a checkpoint file holds, read without running code from it (safetensors, on the CPU,
    or ``torch.load(weights_only=True, map_location=...)``); a missing, cut-short or foreign file
    is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        read_header(path)  # a lying header must not reach the native reader
    else:
        check_torch_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # torch's note on a pickle's protocol would precede our one line
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                sd = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # corrupt files raise many types; report them uniformly, in one line
        detail = error_line(e)
        if "Weights only load failed" in detail:  # torch's advice (weights_only=False) is not ours
            detail = (
                "it holds more than tensors, or is cut short (checkpoints are read with "
                "weights_only=True: no code from a file runs)"
            )
        raise CheckpointError(f"cannot read checkpoint {path}: {detail}") from e
    return sd


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor shapes, raw metadata) of a safetensors file, checked against the file's size.

    Reads only the header, so a hostile file is refused before anything is allocated for it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read checkpoint {path}: not a valid safetensors file ({why})")

    if size < 8:
        raise bad(f"only {size} bytes")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"its header claims {n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:  # JSON and UTF-8 errors
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("metadata is not a map of strings")
    data = size - 8 - n
    shapes = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                dtype in _DTYPE_BYTES
                and all(type(d) is int and d >= 0 for d in shape)
                and type(start) is int
                and type(end) is int
                and 0 <= start <= end <= data
                and end - start == math.prod(shape) * _DTYPE_BYTES[dtype]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name!r} has a bad entry or lies past the end of the file (truncated?)")
        shapes[name] = tuple(shape)
    return shapes, meta


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks (checkpoints can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of a state dict, or of a name -> shape mapping (as :func:`read_header` gives)."""
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _listing(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"({len(keys)}): " + ", ".join(keys[:_SHOWN]) + more


@functools.cache
def _preset_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A preset's key -> shape signature, from a weightless (meta) build; cached per name."""
    from .presets import build_preset

    return tuple(_shapes(build_preset(name, device="meta").state_dict()).items())


def fitting_presets(sd: Mapping[str, Any]) -> list[str]:
    """Names of the presets whose state dict has exactly these keys and shapes."""
    from .presets import PRESETS

    shapes = _shapes(sd)
    return [name for name in PRESETS if dict(_preset_shapes(name)) == shapes]


def _mismatch(sd: Mapping[str, Any], model: nn.Module, preset: str | None) -> str | None:
    """A readable description of why ``sd`` does not fit ``model``, or None if it fits."""
    want = _shapes(model.state_dict())
    have = _shapes(sd)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [
        f"{k}: checkpoint {_fmt(have[k])} vs model {_fmt(want[k])}"
        for k in want
        if k in have and have[k] != want[k]
    ]
    if not (missing or unexpected or wrong):
        return None
    lines = ["checkpoint does not fit the model" + (f" (preset '{preset}')" if preset else "") + ":"]
    if missing:
        lines.append("  missing keys " + _listing(missing))
    if unexpected:
        lines.append("  unexpected keys " + _listing(unexpected))
    if wrong:
        more = f"\n    ... ({len(wrong) - _SHOWN} more)" if len(wrong) > _SHOWN else ""
        lines.append(f"  wrong shapes ({len(wrong)}):\n    " + "\n    ".join(wrong[:_SHOWN]) + more)
    fits = fitting_presets(sd)
    if fits:
        names = ", ".join(f"'{n}'" for n in fits)
        lines.append(f"  the checkpoint fits preset{'s' if len(fits) > 1 else ''} {names}")
    else:
        lines.append("  no preset fits the checkpoint")
    return "\n".join(lines)


def load_weights(
    model: nn.Module,
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    preset: str | None = None,
) -> nn.Module:
    """Load weights strictly into ``model`` (cast to its dtypes, so fp32 weights fit a use_fp16
    model); ``preset`` names the model's preset for the error message. Returns the model.
    A model built on meta (``build_network(config, "meta")``) takes the loaded tensors themselves
    (those of a given state dict too; cast or made contiguous where they differ from the model's):
    no second build with random weights, no copy."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_weights: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        sd: Mapping[str, torch.Tensor] = load_state_dict(state_dict_or_path)
    elif _is_state_dict(state_dict_or_path):
        sd = state_dict_or_path
    else:  # None, a number, numpy arrays as values: not the deep AttributeError/ValueError
        raise CheckpointError(
            "load_weights: state_dict_or_path must be a state dict (a mapping of names to tensors) "
            f"or a path, got {type(state_dict_or_path).__name__}"
        )
    check_fits(sd, model, preset)
    targets = model.state_dict(keep_vars=True)
    if not any(t.is_meta for t in targets.values()):
        model.load_state_dict(sd, strict=True)
        return model
    own = {k: v.to(dtype=targets[k].dtype, memory_format=torch.contiguous_format) for k, v in sd.items()}
    model.load_state_dict(own, strict=True, assign=True)
    left = [name for name, t in model.named_buffers() if t.is_meta]
    if left:  # not in a state dict, so no file can give them: the model would fail at its first use
        raise ValueError(
            f"load_weights: a model on meta keeps its non-persistent buffers ({', '.join(left)}) "
            "without data; build it on a real device"
        )
    return model


def check_fits(sd: Mapping[str, Any], model: nn.Module, preset: str | None = None) -> None:
    """Raise CheckpointError unless ``sd`` (tensors or shapes) fits ``model``, which may be on meta."""
    problem = _mismatch(sd, model, preset)
    if problem:
        raise CheckpointError(problem)


def save_weights(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write weights as safetensors, atomically (a killed write leaves no file under the real
    name); metadata values are JSON-encoded (safetensors stores strings)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from fastdiff.files import atomic_write

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_weights writes safetensors; use a .safetensors path, not {path.name}")
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    if not _is_state_dict(sd):
        raise TypeError(
            f"save_weights: model must be an nn.Module or a state dict, got {type(model).__name__}"
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}

    def write(tmp):
        try:
            save_file(tensors, tmp, metadata=meta)
            _sort_metadata(tmp)
        except SafetensorError as e:
            # its I/O failures (a full disk) are no OSError, so callers' one-line reports missed them;
            # the errno is "(os error 28)" from safetensors 0.6.1 on, "Os { code: 28, ..." before
            code = re.search(r"(?:\(os error |Os \{ code: )(\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), tmp) from None

    atomic_write(path, write)


def _sort_metadata(path: str) -> None:
    """Rewrite the header safetensors wrote with its metadata in key order, in place.

    The library keeps metadata in a hash map seeded anew for every save, so the same weights and
    flags gave other bytes each time (and another sha256, which run.json compares); the tensors'
    order and offsets are the library's own and already fixed. The header is written again as
    the library writes JSON (compact, UTF-8), the same length, so the data does not move.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:
            raise RuntimeError(f"safetensors header of {path} re-encoded longer ({len(text)} > {n} bytes)")
        f.seek(8)
        f.write(text.ljust(n))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`save_weights` stored, JSON-decoded (non-JSON strings are returned raw)."""
    _, raw = read_header(path)
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
