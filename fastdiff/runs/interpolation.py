"""The spherical interpolation between two latents (``fastdiff interpolate``), sampled with
deterministic DDIM (eta 0) so a latent always gives the same image.

``interpolate`` samples the path between two x_T, each a seed (the x_T image 0 of a sampling
run with that seed starts from) or a latent fastdiff.runs.invert wrote, as one strip PNG, a
batch of frames at a time. Under torchrun the batches are dealt over the ranks round by round
(fastdiff.runs.ddim.dealt) and rank 0 alone writes the strip.
"""

from __future__ import annotations

import dataclasses
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fastdiff import distributed
from fastdiff.diffusion.inversion import slerp
from fastdiff.diffusion.samplers import randn
from fastdiff.files import save_grid, to_uint8
from fastdiff.runs import ranks
from fastdiff.runs.ddim import DDIMOptions, check_class, dealt, setup
from fastdiff.runs.device import check_seed
from fastdiff.runs.errors import RunError, check_arguments
from fastdiff.runs.folder import check_writable
from fastdiff.runs.loading import LoadedModel
from fastdiff.runs.sampling import batch_generator


def _latents_spec(spec: str) -> tuple[str, str] | None:
    """(file, index) of LATENTS.npz[:INDEX]; None for a seed. The index follows the last colon,
    so a file name may hold colons."""
    if re.fullmatch(r"-?\d+", spec):
        return None
    if ":" not in spec or Path(spec).is_file():
        return spec, ""
    path, _, index = spec.rpartition(":")
    return path, index


def _stored(spec: str, key: str) -> str | None:
    """How a latents file was inverted (fastdiff invert stores its ``respacing`` and any
    ``cfg_scale``), if readable: DDIM's ends are the reconstructions only with those."""
    parts = _latents_spec(spec)
    if parts is None or not Path(parts[0]).is_file():
        return None
    try:
        stored = _read_latents(parts[0]).get(key)
    except RunError:
        return None  # _endpoint says what is wrong with the file
    return None if stored is None else str(stored)


def _read_latents(path: str) -> dict[str, np.ndarray]:
    """Every array of the npz ``path``; one line where it is no readable npz of arrays (an .npy,
    a pickle, a cut or corrupt zip: numpy's and zipfile's many errors)."""
    try:
        z = np.load(path)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("an .npy file")
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise RunError(f"cannot read latents {path}: {e}") from None
    except ValueError:  # numpy's advice (load it with allow_pickle) is not for a user
        raise RunError(
            f"cannot read latents {path}: not an npz of arrays (fastdiff invert writes one)"
        ) from None


def _inverted_with(start: str, end: str, key: str, what: str, options: str) -> str | None:
    """The ``key`` both latents files stored (seeds store none); one line where they differ."""
    stored = {r for r in (_stored(start, key), _stored(end, key)) if r is not None}
    if len(stored) > 1:
        raise RunError(
            f"--from and --to were inverted with different {what} ({', '.join(sorted(stored))}); "
            f"pass {options}"
        )
    return stored.pop() if stored else None


def _endpoint(spec: str, option: str, loaded: LoadedModel, device) -> tuple[torch.Tensor, int | None]:
    """(x_T of shape 1xCxHxW, its label if stored) for a seed or LATENTS.npz[:INDEX]."""
    shape = (1, loaded.in_channels, loaded.image_size, loaded.image_size)
    parts = _latents_spec(spec)
    if parts is None:
        check_seed(int(spec), f"{option}'s seed")
        return randn(shape, batch_generator(device, int(spec), 0), device), None
    path, index = parts
    try:
        i = int(index or 0)
    except ValueError:
        raise RunError(f"'{spec}': expected a seed or LATENTS.npz[:INDEX]") from None
    if not Path(path).is_file():
        raise RunError(f"{option} '{spec}' is neither a seed nor a latents file ({path} not found)")
    arrays = _read_latents(path)
    if "arr_0" not in arrays:
        raise RunError(f"cannot read latents {path}: it has no arr_0 (fastdiff invert writes one)")
    latents, labels = arrays["arr_0"], arrays.get("arr_1")
    if latents.ndim != 4 or latents.shape[1:] != shape[1:] or latents.dtype != np.float32:
        raise RunError(
            f"{path} holds {latents.dtype} latents of shape {list(latents.shape[1:])}; "
            f"this model's are float32 {list(shape[1:])}"
        )
    if labels is not None and (
        labels.shape != latents.shape[:1] or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise RunError(
            f"{path}: arr_1 must hold one integer class per latent ({len(latents)}), "
            f"got {labels.dtype} of shape {list(labels.shape)}"
        )
    if not 0 <= i < len(latents):
        raise RunError(f"{path} holds {len(latents)} latents; index {i} is out of range")
    if not np.isfinite(latents[i]).all():
        raise RunError(f"{path}: latent {i} holds NaN or infinite values")
    x_T = torch.from_numpy(latents[i : i + 1].copy()).to(device)
    return x_T, None if labels is None else int(labels[i])


def interpolate(
    start: str,
    end: str,
    out: str | Path,
    options: DDIMOptions,
    *,
    frames: int = 8,
    label: int | str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> int:
    """Sample ``frames`` images along the slerp from ``start`` to ``end`` (each a seed or
    LATENTS.npz[:INDEX]) as one strip PNG ``out``; returns the DDIM steps taken. Every frame has
    class ``label`` (default: ``start``'s stored label). Without steps or a respacing in
    ``options``, latents files' own (the steps they were inverted with) are used, and so is
    their classifier-free guidance without a cfg_scale in ``options``, so the ends
    are their reconstructions (an end inverted with another class than ``label`` is regenerated
    under ``label``). ``progress`` shows a bar of the DDIM steps."""
    check_arguments(interpolate, locals())
    if batch_size < 1:
        raise RunError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise RunError(f"--out {out}: the strip is a PNG; name it .png")
    if frames < 2:
        raise RunError(f"--frames must be at least 2, got {frames}", usage=True)
    if options.steps is None and options.respacing is None:
        respacing = _inverted_with(start, end, "respacing", "steps", "--steps or --respacing")
        if respacing is not None:
            options = dataclasses.replace(options, respacing=respacing)
    if options.cfg_scale is None:
        cfg_scale = _inverted_with(start, end, "cfg_scale", "--cfg-scale", "--cfg-scale")
        if cfg_scale is not None:
            try:
                options = dataclasses.replace(options, cfg_scale=float(cfg_scale))
            except ValueError:
                raise RunError(f"the latents' stored cfg_scale is not a number: {cfg_scale!r}") from None
    loaded, sampler, dev, _ = setup(options)
    with ranks.agreed("checking the latents"):
        if distributed.is_main():  # it writes the strip
            if out.is_dir():
                raise RunError(f"--out {out} is a folder; name the strip's PNG file")
            check_writable(out.parent, f"--out {out}")
        a, label_a = _endpoint(start, "--from", loaded, dev)
        b, _ = _endpoint(end, "--to", loaded, dev)
        label = check_class(loaded, label, "--class")
        if loaded.class_cond and label is None:  # an unconditional model has no use for a stored label
            label = check_class(loaded, label_a, f"--from {start}'s stored class")
            if label is None:
                raise RunError("the model is class-conditional: pass --class K")

    def work(lo: int, hi: int, step) -> np.ndarray:
        y = None if label is None else torch.full((hi - lo,), label, device=dev)
        path = torch.cat([slerp(a, b, k / (frames - 1)) for k in range(lo, hi)])
        return to_uint8(sampler(y, noise=path, callback=step))

    images: list[np.ndarray] = []  # rank 0's: the strip is one image
    batches = [(lo, min(lo + batch_size, frames)) for lo in range(0, frames, batch_size)]
    dealt(
        sampler,
        batches,
        work,
        lambda lo, hi, made: images.append(made),
        "frames",
        progress=progress,
        desc="interpolating",
    )
    with ranks.agreed("writing the strip"):
        if distributed.is_main():
            try:
                save_grid(np.concatenate(images), out, ncol=frames)
            except OSError as e:
                raise RunError(f"cannot write {out}: {e.strerror or e}") from None
    return sampler.diffusion.num_timesteps
