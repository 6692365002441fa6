"""``fastdiff invert`` and ``fastdiff interpolate``: images to latents and back, and paths between
latents, all sampled with deterministic DDIM (eta 0) so a latent always gives the same image.

``invert`` maps images to x_T with the model (and each image's class) by DDIM inversion
(fastdiff.diffusion.inversion), regenerates them to report the reconstruction PSNR and, with
``--to-class``, regenerates the same latents under another class (class editing). ``interpolate``
samples the spherical interpolation between two x_T, each a seed (the x_T image 0 of
``fastdiff sample --seed S`` starts from) or a latent ``invert`` wrote, as one strip.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastdiff.cli.folders import exclusive_folder
from fastdiff.cli.loading import LoadedModel, load_diffusion_model
from fastdiff.cli.sample import _batch_generator, check_run_options, respacing_for
from fastdiff.diffusion.inversion import slerp
from fastdiff.diffusion.samplers import randn
from fastdiff.engines import ENGINES, EngineError
from fastdiff.engines.sampler import DTYPES, Sampler
from fastdiff.files import atomic_write, save_grid, save_png, to_uint8

_CLASS_IN_NAME = re.compile(r"_class(\d+)$")


def _model_options(command):
    """The options invert and interpolate share: the model, DDIM steps, CFG and where it runs."""
    options = [
        click.option("--preset", help="Model preset (see `fastdiff presets`); with --checkpoint."),
        click.option("--flags", "flag_string", help="guided-diffusion model flags, instead of --preset."),
        click.option("--checkpoint", type=click.Path(path_type=Path), help="Diffusion model weights."),
        click.option("--steps", type=int, default=None, help="DDIM steps (default 25)."),
        click.option("--respacing", default=None, help="guided-diffusion respacing instead of --steps."),
        click.option("--cfg-scale", type=float, default=None, help="Classifier-free guidance weight w."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--engine", type=click.Choice(list(ENGINES)), default=None, help="How a step runs."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads."),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def _setup(*, preset, flag_string, checkpoint, steps, respacing, cfg_scale, engine, threads, dtype, device):
    """(loaded model, Sampler: DDIM eta 0 with CFG if asked, device), every option checked; the
    keywords are `_model_options`' (but --batch-size, which the commands use themselves)."""
    dev, engine = check_run_options(device, dtype, threads, engine, "ddim", 0.0)
    loaded = load_diffusion_model(preset=preset, flag_string=flag_string, checkpoint=checkpoint, device=dev)
    if cfg_scale is not None and loaded.null_label is None:
        raise click.ClickException("--cfg-scale needs a model trained with a null label")
    diffusion = loaded.diffusion(respacing_for("ddim", steps, respacing, loaded.num_timesteps))
    try:
        sampler = Sampler(
            loaded.model,
            diffusion,
            cfg_scale=cfg_scale,
            null_label=loaded.null_label,
            engine=engine,
            dtype=dtype,
            device=dev,
            image_shape=(loaded.in_channels, loaded.image_size, loaded.image_size),
        )
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    return loaded, sampler, dev


def _check_class(loaded: LoadedModel, label: int | None, what: str) -> int | None:
    if label is None:
        return None
    if not loaded.class_cond:
        raise click.ClickException(f"{what} given, but the model is not class-conditional")
    if not 0 <= label < loaded.num_real_classes:
        raise click.ClickException(
            f"{what} {label} out of range: the model has {loaded.num_real_classes} classes"
        )
    return label


def _read_image(path: Path, loaded: LoadedModel) -> np.ndarray:
    """One image as uint8 HWC in the model's channels, at the model's size exactly."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if loaded.in_channels == 1 else "RGB")
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise click.ClickException(f"cannot read image {path}: {e}") from None
    if array.shape[:2] != (loaded.image_size, loaded.image_size):
        raise click.ClickException(
            f"{path} is {array.shape[1]}x{array.shape[0]}; the model takes "
            f"{loaded.image_size}x{loaded.image_size} images"
        )
    return array.reshape(loaded.image_size, loaded.image_size, loaded.in_channels)


def _labels(paths: list[Path], classes: str | None, loaded: LoadedModel) -> list[int] | None:
    """Each image's class: --classes (cycled), else a ``_classK`` at the end of its file name (as
    fastdiff sample names its PNGs); required for a class-conditional model."""
    if not loaded.class_cond:
        if classes is not None:
            raise click.ClickException("--classes given, but the model is not class-conditional")
        return None
    if classes is not None:
        try:
            ids = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise click.ClickException(f"--classes must be class ids like 3,5, got '{classes}'") from None
        if not ids:
            raise click.ClickException(f"--classes '{classes}' names no class id")
        labels = [ids[i % len(ids)] for i in range(len(paths))]
    else:
        labels = []
        for p in paths:
            m = _CLASS_IN_NAME.search(p.stem)
            if m is None:
                raise click.ClickException(
                    f"the model is class-conditional: pass --classes, or name {p.name} like 000003_class7.png"
                )
            labels.append(int(m[1]))
    for label in labels:
        _check_class(loaded, label, "class")
    return labels


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _batches(n: int, size: int):
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _with_labels(labels: list[int] | None, lo: int, hi: int, device) -> torch.Tensor | None:
    return None if labels is None else torch.tensor(labels[lo:hi], device=device)


def _save_npz(path: Path, *arrays: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, *arrays)

    atomic_write(path, write)


@click.command("invert")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option(
    "--classes", default=None, help="The images' class ids, cycled (default: _classK in each name)."
)
@click.option("--to-class", type=int, default=None, help="Also regenerate the latents under this class.")
@_model_options
def invert_command(images, out, classes, to_class, batch_size, **model):
    """DDIM-invert IMAGES to latents x_T (reconstruction PSNR); --to-class edits their class.

    Writes latents.npz (arr_0 x_T float32 NCHW, arr_1 labels; `fastdiff interpolate` reads it),
    reconstructed/ and edited/ PNGs, comparison.png (inputs, reconstructions, edits as rows) and
    invert.json with each image's PSNR.
    """
    paths = list(images)
    for p in paths:
        if not p.is_file():
            raise click.ClickException(f"image not found: {p}")
    loaded, sampler, dev = _setup(**model)
    labels = _labels(paths, classes, loaded)
    _check_class(loaded, to_class, "--to-class")
    inputs = np.stack([_read_image(p, loaded) for p in paths])
    with exclusive_folder(out, "fastdiff invert"):
        latents, recon, edited = [], [], []
        for lo, hi in _batches(len(paths), batch_size):
            x0 = torch.from_numpy(inputs[lo:hi]).to(dev).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)
            y = _with_labels(labels, lo, hi, dev)
            x_T = sampler.invert(x0, y)
            latents.append(x_T.cpu())
            recon.append(to_uint8(sampler(y, noise=x_T)))
            if to_class is not None:
                edited.append(to_uint8(sampler(torch.full((hi - lo,), to_class, device=dev), noise=x_T)))
        latents_np = torch.cat(latents).numpy()
        recon_np = np.concatenate(recon)
        psnr = [_psnr(a, b) for a, b in zip(inputs, recon_np, strict=True)]
        try:
            _save_npz(
                out / "latents.npz", *([latents_np] if labels is None else [latents_np, np.array(labels)])
            )
            for i, img in enumerate(recon_np):
                save_png(img, out / "reconstructed" / f"{i:06d}.png")
            rows = [inputs, recon_np]
            if to_class is not None:
                rows.append(np.concatenate(edited))
                for i, img in enumerate(rows[-1]):
                    save_png(img, out / "edited" / f"{i:06d}_class{to_class}.png")
            save_grid(np.concatenate(rows), out / "comparison.png", ncol=len(paths))
            record = {
                "images": [str(p) for p in paths],
                "labels": labels,
                "respacing": respacing_for("ddim", model["steps"], model["respacing"], loaded.num_timesteps),
                "cfg_scale": model["cfg_scale"],
                "model": loaded.identity,
                "psnr": psnr,
                "mean_psnr": float(np.mean(psnr)),
                "to_class": to_class,
            }
            atomic_write(out / "invert.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        except OSError as e:
            raise click.ClickException(f"cannot write to {out}: {e.strerror or e}") from None
    click.echo(
        f"inverted {len(paths)} images over {sampler.diffusion.num_timesteps} DDIM steps: reconstruction "
        f"PSNR mean {np.mean(psnr):.2f} dB (min {min(psnr):.2f}) -> {out}"
    )


def _endpoint(spec: str, loaded: LoadedModel, device) -> tuple[torch.Tensor, int | None]:
    """(x_T of shape 1xCxHxW, its label if stored) for a seed or LATENTS.npz[:INDEX]."""
    shape = (1, loaded.in_channels, loaded.image_size, loaded.image_size)
    if re.fullmatch(r"-?\d+", spec):
        return randn(shape, _batch_generator(device, int(spec), 0), device), None
    path, _, index = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    try:
        i = int(index or 0)
    except ValueError:
        raise click.ClickException(f"'{spec}': expected a seed or LATENTS.npz[:INDEX]") from None
    if not Path(path).is_file():
        raise click.ClickException(f"'{spec}' is neither a seed nor a latents file")
    try:
        with np.load(path) as z:
            latents = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in z.files else None
    except (OSError, ValueError, KeyError) as e:
        raise click.ClickException(f"cannot read latents {path}: {e}") from None
    if latents.ndim != 4 or latents.shape[1:] != shape[1:] or latents.dtype != np.float32:
        raise click.ClickException(
            f"{path} holds {latents.dtype} latents of shape {list(latents.shape[1:])}; "
            f"this model's are float32 {list(shape[1:])}"
        )
    if not 0 <= i < len(latents):
        raise click.ClickException(f"{path} holds {len(latents)} latents; index {i} is out of range")
    x_T = torch.from_numpy(latents[i : i + 1].copy()).to(device)
    return x_T, None if labels is None else int(labels[i])


@click.command("interpolate")
@click.option("--from", "start", required=True, help="A seed, or LATENTS.npz[:INDEX] from fastdiff invert.")
@click.option("--to", "end", required=True, help="A seed, or LATENTS.npz[:INDEX] from fastdiff invert.")
@click.option(
    "--frames", type=click.IntRange(min=2), default=8, show_default=True, help="Images, ends included."
)
@click.option("--class", "label", type=int, default=None, help="Class of every frame (default: --from's).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("interpolation.png"), show_default=True)
@_model_options
def interpolate_command(start, end, frames, label, out, batch_size, **model):
    """Sample the spherical interpolation between two latents as one strip PNG.

    A seed's latent is the x_T image 0 of `fastdiff sample --seed S` starts from, so with the same
    model, steps and guidance (ddim) the strip's ends are those samples.
    """
    if out.suffix.lower() != ".png":
        raise click.ClickException(f"--out {out}: the strip is a PNG; name it .png")
    loaded, sampler, dev = _setup(**model)
    a, label_a = _endpoint(start, loaded, dev)
    b, _ = _endpoint(end, loaded, dev)
    label = _check_class(loaded, label if label is not None else label_a, "--class")
    if loaded.class_cond and label is None:
        raise click.ClickException("the model is class-conditional: pass --class K")
    path = torch.cat([slerp(a, b, k / (frames - 1)) for k in range(frames)])
    images = []
    for lo, hi in _batches(frames, batch_size):
        y = None if label is None else torch.full((hi - lo,), label, device=dev)
        images.append(to_uint8(sampler(y, noise=path[lo:hi])))
    try:
        save_grid(np.concatenate(images), out, ncol=frames)
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    click.echo(
        f"{frames} frames from {start} to {end} ({sampler.diffusion.num_timesteps} DDIM steps) -> {out}"
    )
