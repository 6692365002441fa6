"""DDIM inversion runs (``fastdiff invert``): images to latents x_T and back (reconstruction
PSNR, class edits), with deterministic DDIM (eta 0) so a latent always gives the same image.

``invert_images`` maps images to x_T with the model (and each image's class) by DDIM inversion
(fastdiff.diffusion.inversion), regenerates them to measure the reconstruction PSNR and, with
``to_class``, regenerates the same latents under another class; fastdiff.runs.interpolation
samples the path between two of its latents.

It makes its images a batch at a time and writes each batch's files as it comes, so a folder of
any size is held a few batches at a time, not whole. Its folder is a sampling run's (run.json,
batches/, --resume after a kill). Under torchrun it deals its batches over the ranks round by
round (fastdiff.runs.ddim.dealt) and rank 0 alone holds the folder and writes; every batch is
deterministic, so the files are one process's, resumed or not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdiff import distributed
from fastdiff.files import (
    atomic_write,
    bytes_digest,
    image_digest,
    in_channels,
    npz_stream,
    save_grid,
    save_npz,
    save_png,
    to_uint8,
)
from fastdiff.runs import ranks
from fastdiff.runs.ddim import DDIMOptions, check_class, dealt, setup
from fastdiff.runs.errors import RunError, check_arguments
from fastdiff.runs.folder import (
    EDITED,
    RECONSTRUCTED,
    RUN_FILE,
    locked_run_folder,
    writing,
)
from fastdiff.runs.loading import LoadedModel
from fastdiff.runs.plan import InversionPlan, class_ids, class_list
from fastdiff.runs.sampling import recorded
from fastdiff.runs.writer import batch_npz
from fastdiff.training.data import (
    DataError,
    center_crop_arr,
    class_prefix,
    image_files,
    image_header,
    missing_codec,
)

_CLASS_IN_NAME = re.compile(r"_class(\d+)$")
# comparison.png shows the first images, as sample's grid.png its first hundred: a column for
# every image made PNGs no viewer opens (2,580,002 px wide for 10,000 images at 256 px)
COMPARED = 100


def _image_paths(args: list[Path], out: Path) -> list[tuple[Path, Path | None]]:
    """Each image with the folder argument it was found in (None for a file given itself): a
    folder gives its images recursively, as training reads its --data folder, but for those in
    ``out``, the run's own PNGs (a resume of ``invert data/ --out data/inv`` took them for
    images to invert, and refused the run as another); a folder in ``out`` is left to the
    folder's check (``invert run/images --out run``: a folder holding a run)."""
    own = os.path.realpath(out)
    found = []
    for p in args:
        if p.is_dir():
            try:
                files = image_files(p)
            except DataError as e:
                raise RunError(str(e)) from None
            if os.path.commonpath([own, os.path.realpath(p)]) != own:  # not a folder of --out's
                files = [f for f in files if os.path.commonpath([own, os.path.realpath(f)]) != own]
            if not files:
                raise RunError(f"no images found under {p} outside --out {out}")
            found += [(f, p) for f in files]
        elif p.is_file():
            found.append((p, None))
        else:
            raise RunError(f"image not found: {p}")
    return found


def _as_recorded(out: Path, images: list[str]) -> list[str]:
    """The images as the run in ``out`` recorded them where ``images`` name the same files
    (os.path.samefile: through a linked folder, a link to a file, a hard link), so a resume
    through another path to them continues the run; else ``images``, which the resume's check
    of run.json refuses where they differ (other files, the same pixels or not)."""
    try:
        old = json.loads((out / RUN_FILE).read_text())["images"]
        same = all(a == b or os.path.samefile(a, b) for a, b in zip(old, images, strict=True))
    except (OSError, ValueError, LookupError, TypeError):  # a recorded file gone, no such record
        return images  # the run.json check says what differs
    return old if same else images


def _scanned(paths: list[Path], size: int) -> tuple[list[bool], list[bool]]:
    """Whether each image is resized to ``size`` and whether it has transparency, from its header
    (training's scan): every image is checked before the work, and decoded only in its batch.
    Under torchrun each rank reads its block of the headers and every rank gets them all."""
    headers = ranks.mapped("checking the images", image_header, paths)
    fault = next((fault for fault, _, _ in headers if fault is not None), None)
    if fault is not None:
        raise RunError(fault)
    return [dims != (size, size) for _, dims, _ in headers], [alpha for _, _, alpha in headers]


def _image_file(path: Path) -> bytes:
    """The image file ``path``'s bytes; one line where it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise RunError(f"cannot read image {path}: {e.strerror or e}") from None


def _read_image(path: Path, loaded: LoadedModel, data: bytes | None = None) -> np.ndarray:
    """One image as uint8 HWC in the model's channels and size, read as training reads its data
    (its channels converted, another size resized and center-cropped); decoded from ``data``, its
    file's bytes, where they were read already (a batch records the digest of the bytes decoded)."""
    size, data = loaded.image_size, _image_file(path) if data is None else data
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = center_crop_arr(in_channels(img, loaded.in_channels), size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        unknown = isinstance(e, Image.UnidentifiedImageError)  # PIL's line names the BytesIO
        why = missing_codec(path) or ("no image PIL identifies" if unknown else e)
        raise RunError(f"cannot read image {path}: {why}") from None
    return array.reshape(size, size, loaded.in_channels)


def _layout_names(path: Path, root: Path | None) -> list[str]:
    """The class names training's layouts could give ``path``: the folders from its folder
    argument ``root`` (a file given itself: its own folder) down to it, and its CLASS_ prefix."""
    top = Path(os.path.abspath(path.parent if root is None else root)).name
    below = () if root is None else path.parent.relative_to(root).parts
    return [n for n in (top, *below, class_prefix(path)) if n]


def _labels(
    images: list[tuple[Path, Path | None]], classes: str | None, loaded: LoadedModel
) -> list[int] | None:
    """Each image's class: --classes (cycled); else the training layout the model's class names
    describe (a folder or CLASS_ prefix that is one of them) or a ``_classK`` at the end of its
    file name (as fastdiff sample names its PNGs), which must agree. Required for a
    class-conditional model."""
    if not loaded.class_cond:
        if classes is not None:
            raise RunError("--classes given, but the model is not class-conditional")
        return None
    if classes is not None:
        ids = [
            check_class(loaded, k, "--classes' class") for k in class_ids(classes, names=loaded.class_names)
        ]
        return [ids[i % len(ids)] for i in range(len(images))]
    names = loaded.class_names or []
    labels = []
    for p, root in images:
        layout = _layout_names(p, root)
        found = {f"'{n}'": names.index(n) for n in layout if n in names}
        m = _CLASS_IN_NAME.search(p.stem)
        if m is not None:
            found[m[0]] = int(m[1])
        if len(set(found.values())) > 1:
            raise RunError(
                f"{p}: its folders and name give different classes ({', '.join(found)}); pass --classes"
            )
        if not found:
            unknown = ""
            if not names:
                unknown = " (its weights keep no class names to read a class folder by)"
            elif layout:
                verb = "is" if len(layout) == 1 else "are"
                unknown = f" ({', '.join(map(repr, layout))} {verb} none of its classes: {class_list(names)})"
            raise RunError(
                f"the model is class-conditional: pass --classes, or name {p.name} like "
                f"000003_class7.png{unknown}"
            )
        labels.append(check_class(loaded, found.popitem()[1], f"{p}: class"))  # which of many files
    return labels


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _json_safe(record: dict) -> dict:
    """The record with an exact reconstruction's infinite PSNR as null: json would write it as
    Infinity, which strict JSON readers refuse."""

    def finite(v: float) -> float | None:
        return None if v == math.inf else v

    return {**record, "psnr": [finite(v) for v in record["psnr"]], "mean_psnr": finite(record["mean_psnr"])}


def _with_labels(labels: list[int] | None, lo: int, hi: int, device) -> torch.Tensor | None:
    return None if labels is None else torch.tensor(labels[lo:hi], device=device)


def _changed(path: Path, npz: Path) -> RunError:
    return RunError(
        f"{path} is not the image {npz} was inverted from; restore it, or delete that file "
        "and run again with --resume to invert its batch again"
    )


def _inputs(paths: list[Path], lo: int, digests: list[str], npz: Path, loaded: LoadedModel) -> np.ndarray:
    """Images lo, lo+1, ... read again, refused in one line where one is no longer the image the
    batch file ``npz`` was inverted from (its pixel ``digests``): comparison.png shows what the
    run made from the images it started with."""
    inputs = np.stack([_read_image(p, loaded) for p in paths[lo : lo + len(digests)]])
    for path, image, digest in zip(paths[lo:], inputs, digests):
        if image_digest(image) != digest:
            raise _changed(path, npz)
    return inputs


def _kept(paths: list[Path], lo: int, npz: Path, loaded: LoadedModel) -> None:
    """A resume's check that the batch file ``npz``'s images, lo, lo+1, ..., are still the ones it
    was inverted from: each file by its bytes, and by its pixels only where they differ (a PNG
    saved again, a batch of an older fastdiff, which recorded pixels alone): decoding them all
    made the check of 3,000 256-px JPEGs take 3.4 s of CPU, not 0.5. One line where one changed."""
    with np.load(npz) as z:
        digests = z["digests"].tolist()
        files = z["file_digests"].tolist() if "file_digests" in z.files else [None] * len(digests)
    for path, digest, file in zip(paths[lo:], digests, files):
        data = _image_file(path)
        if bytes_digest(data) != file and image_digest(_read_image(path, loaded, data)) != digest:
            raise _changed(path, npz)


def _write_batch(out: Path, b: int, lo: int, result: tuple, to_class: int | None, labels) -> None:
    """Batch ``b``'s reconstructed/ and edited/ PNGs, then its npz, last, so the npz marks the
    batch done (as a sampling run's, fastdiff.runs.writer): arr_0 the reconstructions (uint8
    NHWC), arr_1 the labels, its latents, each image's PSNR and its inputs' digests (of their
    pixels, and of their files' bytes)."""
    inputs, files, x_T, recon, edit = result
    with writing(out):
        for i, img in enumerate(recon, lo):
            save_png(img, out / RECONSTRUCTED / f"{i:06d}.png")
        for i, img in enumerate(() if edit is None else edit, lo):
            save_png(img, out / EDITED / f"{i:06d}_class{to_class}.png")
        named = {"latents": x_T, "psnr": np.array([_psnr(a, b) for a, b in zip(inputs, recon, strict=True)])}
        named["digests"] = np.array([image_digest(image) for image in inputs])
        named["file_digests"] = np.array(files)
        if edit is not None:
            named["edited"] = edit
        save_npz(batch_npz(out, b), recon, None if labels is None else np.array(labels), **named)


def _write_results(out: Path, plan: InversionPlan, record: dict, loaded: LoadedModel) -> None:
    """latents.npz (x_T between the settings and the labels), comparison.png (its first COMPARED
    images) and invert.json (``record`` completed with each image's PSNR), from the batch files
    one at a time: a batch is held, and the comparison's images, not the run."""
    paths = [Path(p) for p in record["images"]]
    n, psnr = len(paths), []
    rows: list[list[np.ndarray]] = [[], []] if plan.to_class is None else [[], [], []]  # the comparison's

    def latents() -> Iterator[np.ndarray]:
        for b, (lo, _) in enumerate(plan.batches(n)):
            npz = batch_npz(out, b)
            with np.load(npz) as z:
                psnr.extend(z["psnr"].tolist())
                if lo < COMPARED:
                    shown = [z["arr_0"]] if plan.to_class is None else [z["arr_0"], z["edited"]]
                    shown = [images[: COMPARED - lo].copy() for images in shown]  # not views holding it
                    inputs = _inputs(paths, lo, z["digests"][: COMPARED - lo].tolist(), npz, loaded)
                    for row, images in zip(rows, [inputs, *shown], strict=True):
                        row.append(images)
                yield z["latents"]

    shape = (n, loaded.in_channels, loaded.image_size, loaded.image_size)
    with npz_stream(out / "latents.npz") as npz:
        npz.add("respacing", np.array(plan.respacing))
        if plan.cfg_scale is not None:
            npz.add("cfg_scale", np.array(plan.cfg_scale))
        with npz.member("arr_0", shape, np.float32) as add_latents:
            for x_T in latents():
                add_latents(x_T)
        if plan.labels is not None:
            npz.add("arr_1", np.array(plan.labels))
    compared = [np.concatenate(row) for row in rows]
    save_grid(np.concatenate(compared), out / "comparison.png", ncol=len(compared[0]))
    record.update(psnr=psnr, mean_psnr=float(np.mean(psnr)), to_class=plan.to_class)
    text = json.dumps(_json_safe(record), indent=1, allow_nan=False)
    atomic_write(out / "invert.json", lambda tmp: Path(tmp).write_text(text))


@dataclass(frozen=True)
class Inversion:
    """What invert_images wrote to invert.json, the DDIM steps it took and how many images a
    resume found already inverted."""

    record: dict
    steps: int
    kept: int


def invert_images(
    paths: list[Path],
    out: str | Path,
    options: DDIMOptions,
    *,
    classes: str | None = None,
    to_class: int | str | None = None,
    batch_size: int = 16,
    resume: bool = False,
    progress: bool = False,
) -> Inversion:
    """Invert ``paths`` (image files, or folders read recursively as training reads them) into
    the run folder ``out``: latents.npz (arr_0 x_T float32 NCHW, arr_1 labels,
    respacing, cfg_scale where used), reconstructed/ and edited/ PNGs, comparison.png (inputs,
    reconstructions, edits as rows, for the first COMPARED images) and invert.json with each
    image's PSNR (null where the reconstruction is exact) and whether it was resized to the
    model's size. Each image's header is checked first; its pixels are read in its batch, and
    each batch's files written as it comes (with run.json, as a sampling run's), so a few
    batches are held, not the set, and ``resume=True`` after a kill keeps the complete batches
    and makes the rest: the files of an uninterrupted run. ``progress`` shows a bar of the DDIM
    steps."""
    check_arguments(invert_images, locals())
    if isinstance(paths, str | os.PathLike) or not paths:  # a str would be read as its letters
        raise RunError(
            f"invert_images: paths must be a non-empty list of image files or folders, got {paths!r}"
        )
    if batch_size < 1:
        raise RunError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    images = _image_paths([Path(p) for p in paths], out)
    paths = [p for p, _ in images]
    loaded, sampler, dev, respacing = setup(options)
    size, n = loaded.image_size, len(paths)
    resized, alphas = _scanned(paths, size)  # a collective: before the agreed phase
    with ranks.agreed("checking the classes"):
        labels = _labels(images, classes, loaded)
        to_class = check_class(loaded, to_class, "--to-class")
    plan = InversionPlan(
        model=loaded.identity,
        classifier=None,
        classifier_scale=0.0,
        cfg_scale=options.cfg_scale,
        sampler="ddim",
        respacing=respacing,
        eta=0.0,
        seed=0,
        batch_size=batch_size,
        dtype=options.dtype,
        engine=sampler.engine,
        device=dev.type,
        clip_denoised=True,
        labels=labels,
        images=[os.path.abspath(p) for p in paths],  # a resume from another cwd or by the absolute path
        to_class=to_class,
    )
    batches = plan.batches(n)

    def read(path: Path) -> tuple[np.ndarray, str]:  # the pixels and the digest of the bytes decoded
        data = _image_file(path)
        return _read_image(path, loaded, data), bytes_digest(data)

    def work(lo: int, hi: int, step) -> tuple:  # inverted, reconstructed and maybe edited: 2 or 3 passes
        inputs, files = zip(*map(read, paths[lo:hi]), strict=True)
        inputs = np.stack(inputs)
        x0 = torch.from_numpy(inputs).to(dev).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)
        y = _with_labels(labels, lo, hi, dev)
        x_T = sampler.invert(x0, y, callback=step)
        edit = None
        if to_class is not None:
            edit = to_uint8(sampler(torch.full((hi - lo,), to_class, device=dev), noise=x_T, callback=step))
        return inputs, files, x_T.cpu().numpy(), to_uint8(sampler(y, noise=x_T, callback=step)), edit

    def take(lo: int, hi: int, result: tuple) -> None:
        _write_batch(out, lo // batch_size, lo, result, to_class, None if labels is None else labels[lo:hi])

    def kept(done: set[int]) -> None:  # each kept batch's images are still the ones it inverted
        for b in sorted(done):
            _kept(paths, batches[b][0], batch_npz(out, b), loaded)

    with locked_run_folder(out, resume, holder="fastdiff invert", command="invert"):
        if distributed.is_main():  # notes, once, as training's
            if any(resized):
                print(
                    f"note: {sum(resized)} of {n} images are resized and center-cropped to "
                    f"{size}x{size}, as training reads its data",
                    file=sys.stderr,
                )
            if any(alphas):
                print(
                    f"note: {sum(alphas)} of {n} images have transparency (an alpha channel or a "
                    "transparent colour), which is dropped, as training drops it",
                    file=sys.stderr,
                )
            if n > COMPARED:
                print(f"note: comparison.png shows the first {COMPARED} of the {n} images", file=sys.stderr)
        if resume:  # rank 0 holds the folder
            recorded_images = ranks.decided_by_main("checking --out", lambda: _as_recorded(out, plan.images))
            plan = dataclasses.replace(plan, images=recorded_images)
        done = recorded(out, plan, n, (size, size, loaded.in_channels), kept)
        dealt(
            sampler,
            [lohi for b, lohi in enumerate(batches) if b not in done],
            work,
            take,
            "images",
            passes=2 if to_class is None else 3,
            progress=progress,
            desc="inverting",
        )
        record = {
            "images": [str(p) for p in paths],  # as given
            "resized": resized,
            "labels": labels,
            "respacing": respacing,
            "cfg_scale": options.cfg_scale,
            "model": loaded.identity,
        }
        with ranks.agreed("writing the results"), writing(out):  # a full disk stops every rank
            if distributed.is_main():
                _write_results(out, plan, record, loaded)
        record = distributed.broadcast_object(record)  # rank 0 completed it
    kept_images = sum(hi - lo for b, (lo, hi) in enumerate(batches) if b in done)
    return Inversion(record, sampler.diffusion.num_timesteps, kept_images)
