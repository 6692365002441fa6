"""ADM-U super-resolution runs (64->256, 128->512): the upsampler, its low-res input, the cascade.

guided-diffusion's super_res_sample.py semantics: each low-resolution image is scaled to [-1, 1]
and given to the upsampler as ``low_res``, with its label from the npz's ``arr_1`` when the
upsampler is class-conditional; image i of the output is the upsampling of low-res image
i mod N. The run itself is a sampling run (fastdiff.runs.sampling): the same run folder,
batch-by-batch npz, resume and engines (onnx and trt too: the exported upsampler takes
``low_res`` as an input), with each sample's low-res image recorded by content in run.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff.evaluation.metrics import EvaluationError
from fastdiff.evaluation.npz import ImageBatch, read_npz
from fastdiff.files import image_digest
from fastdiff.models.checkpoint import CheckpointError, read_metadata
from fastdiff.models.flags import parse_flags
from fastdiff.models.presets import PRESETS
from fastdiff.runs.device import check_run_options
from fastdiff.runs.errors import RunError, check_arguments
from fastdiff.runs.folder import RUN_FILE, locked_run_folder
from fastdiff.runs.loading import LoadedModel, check_file, load_network
from fastdiff.runs.plan import Plan, UpsamplePlan, check_counts, respacing_for
from fastdiff.runs.record import check_resumable
from fastdiff.runs.sampling import run_sampling


def names_upsampler(preset: str | None, flag_string: str | None, checkpoint: Path | None) -> bool:
    """Whether model options name an upsampler (for commands that take either kind, as export):
    a superres preset, else super-resolution flags (a small or large size) in the flag string or
    a safetensors' own metadata. Unreadable options say no; the loader then names the problem."""
    if preset is not None:
        return preset in PRESETS and PRESETS[preset].kind == "superres"
    flags: dict = {}
    if checkpoint is not None and checkpoint.suffix == ".safetensors" and checkpoint.is_file():
        try:
            own = read_metadata(checkpoint).get("flags")
        except CheckpointError:
            own = None
        flags = dict(own) if isinstance(own, dict) else {}
    if flag_string is not None:
        try:
            flags.update(parse_flags(flag_string))
        except ValueError:
            pass
    return bool({"small_size", "large_size"} & set(flags))


def load_upsampler(*, preset, flag_string, checkpoint: Path | None, device) -> LoadedModel:
    """The upsampler from a preset or flags (or a safetensors' own flags) and its weights; its
    ``net`` is a SuperResConfig (``image_size`` is the large size, ``small_size`` its input's)."""
    if checkpoint is None:
        raise RunError("--checkpoint is required (the upsampler's weights)")
    check_file(checkpoint, "checkpoint")
    return load_network("superres", checkpoint, preset=preset, flag_string=flag_string, device=device)


@dataclass
class LowRes:
    """The images to upsample (uint8 NHWC), read a batch at a time from their npz (50,000 128-px
    images are 2.4 GB), their labels, and each image's digest, taken as read_low_res read them."""

    images: ImageBatch
    labels: np.ndarray | None
    image_digests: list[str]

    def digests(self, n: int) -> str:
        """Samples 0..n-1's low-res images by content (an npz's bytes change with each rewrite),
        8 hex digits a sample: a resume compares the samples both runs share, as it compares
        their labels, so an upsampled run grows with its extended base run (whose npz keeps its
        first images) and still refuses other images for the samples it made."""
        each = self.image_digests
        return "".join(each[i % len(each)] for i in range(n))

    def conditioning(self, lo: int, hi: int) -> dict:
        """Samples lo..hi's ``low_res``, scaled as super_res_sample.py scales it; images that no
        longer match their digests (the npz rewritten during the run) are refused, since run.json
        names the images the run started with."""
        count = len(self.images)
        index = np.arange(lo, hi) % count
        if hi - lo >= count:
            batch = self.images.take(0, count)[index]
        else:
            start, end = lo % count, lo % count + hi - lo
            parts = [self.images.take(start, min(end, count))]
            if end > count:
                parts.append(self.images.take(0, end - count))
            batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for i, image in zip(index, batch, strict=True):
            if image_digest(image) != self.image_digests[i]:
                raise RunError(f"{self.images.source} changed during the run (image {i} differs)")
        return {"low_res": torch.from_numpy(batch).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)}

    def labels_for(self, n: int) -> list[int] | None:
        return None if self.labels is None else self.labels[np.arange(n) % len(self.labels)].tolist()


def check_low_res(upsampler: LoadedModel, size: int, channels: int, labels, source: str) -> None:
    """What the upsampler takes: its small size, its channels, labels of its classes if it is
    class-conditional."""
    want = (upsampler.net.small_size, upsampler.in_channels)
    if (size, channels) != want:
        raise RunError(
            f"{source}: {size}x{size}x{channels} images; the upsampler takes {want[0]}x{want[0]}x{want[1]}"
        )
    if upsampler.class_cond:
        if labels is None:
            raise RunError(f"the upsampler is class-conditional but {source} has no labels")
        classes = upsampler.num_real_classes
        if np.min(labels) < 0 or np.max(labels) >= classes:
            raise RunError(f"{source} has labels outside the upsampler's {classes} classes")


def read_low_res(path: Path) -> LowRes:
    """The low-res npz, every image read through once for its digest, a batch at a time: a corrupt
    or cut file is one line before the upsampler's weights (gigabytes) load, not after."""
    try:
        batch = read_npz(path, role="--low-res")
        digests = [image_digest(image) for images in batch.batches(1024) for image in images]
    except EvaluationError as e:
        raise RunError(str(e)) from None
    return LowRes(batch, None if batch.labels is None else batch.labels.astype(np.int64), digests)


def check_low_res_file(path: Path, low_res: LowRes, upsampler: LoadedModel) -> None:
    """The low-res npz read by read_low_res against what the upsampler takes."""
    if low_res.labels is None and upsampler.class_cond:  # read_npz drops labels that are not labels
        with np.load(path) as z:
            if "arr_1" in z.files:
                raise RunError(f"--low-res {path}: its arr_1 is not one integer label per image")
    _, h, _, c = low_res.images.shape
    check_low_res(upsampler, h, c, low_res.labels, f"--low-res {path}")


def upsample_plan(
    upsampler: LoadedModel, low_res: LowRes, num_samples: int, settings: Plan | None = None, **fields
) -> UpsamplePlan:
    """The run's plan: the upsampler and its low-res input by identity, unguided, with the run
    options of ``settings`` (a cascade's base plan) replaced by ``fields`` (Plan field names).
    An unconditional upsampler ignores the npz's labels, as super_res_sample.py does."""
    own = {f.name: getattr(settings, f.name) for f in dataclasses.fields(Plan)} if settings else {}
    return UpsamplePlan(
        **{
            **own,
            **fields,
            "model": upsampler.identity,
            "classifier": None,
            "classifier_scale": 0.0,
            "cfg_scale": None,
            "labels": low_res.labels_for(num_samples) if upsampler.class_cond else None,
            "low_res": low_res.digests(num_samples),
        }
    )


def upsample_run(
    upsampler: LoadedModel,
    low_res: LowRes,
    plan: UpsamplePlan,
    *,
    num_samples: int,
    out: Path,
    device: torch.device,
    progress: bool,
) -> dict:
    """Upsample into the (locked) ``out`` through fastdiff sample's run machinery."""
    return run_sampling(
        upsampler,
        None,
        plan,
        num_samples=num_samples,
        out=out,
        device=device,
        progress=progress,
        conditioning=low_res.conditioning,
    )


def parse_upsampler_spec(spec: str) -> tuple[str | None, Path]:
    """``PRESET:CHECKPOINT``, or a safetensors ``CHECKPOINT`` that carries its own flags; a leading
    ``~`` in CHECKPOINT is the home folder, as in every path option (no shell expands it after
    ``PRESET:``)."""
    name, sep, rest = spec.partition(":")
    if name in PRESETS and not rest:  # looked for as a file, it was "not found" or the folder "."
        raise RunError(f"--upsample-with {spec}: the preset's weights are missing; pass {name}:CHECKPOINT")
    if sep and name in PRESETS:
        return name, Path(rest).expanduser()
    return None, Path(spec).expanduser()


@dataclass
class Cascade:
    """The upsampler of ``fastdiff sample --upsample-with``, loaded and checked before the base
    model samples; it then super-resolves the base run's samples into ``OUT/upsampled``."""

    upsampler: LoadedModel
    respacing: str

    def plan(self, low_res: LowRes, n: int, base: Plan) -> UpsamplePlan:
        """The upsampled run's plan: the base run's settings, DDPM at the upsampler's respacing."""
        return upsample_plan(
            self.upsampler, low_res, n, base, sampler="ddpm", respacing=self.respacing, eta=0.0
        )

    def check_resume(self, base_out: Path, base: Plan) -> None:
        """A resumed cascade's upsampled run against this upsampler and its settings, before the
        base model samples; its low-res images and labels are compared once the base run made them."""
        out = base_out / "upsampled"
        if (out / RUN_FILE).is_file():
            nothing = LowRes(
                ImageBatch("nothing", (0, 1, 1, 1)), np.zeros(0, np.int64), []
            )  # a prefix of any run
            check_resumable(out, self.plan(nothing, 0, base).record(0))

    def run(self, base_out: Path, npz: Path, plan: Plan, *, resume: bool, device, progress: bool) -> dict:
        low_res = read_low_res(npz)
        out = base_out / "upsampled"
        n = len(low_res.images)
        up = self.plan(low_res, n, plan)
        with locked_run_folder(out, resume):
            return upsample_run(
                self.upsampler, low_res, up, num_samples=n, out=out, device=device, progress=progress
            )


def prepare_cascade(spec: str, base: LoadedModel, labels, steps: int | None, device) -> Cascade:
    """The upsampler for ``--upsample-with SPEC``, checked against the base model's samples."""
    preset, path = parse_upsampler_spec(spec)
    check_file(path, "--upsample-with checkpoint")  # a typo'd path was told to name a preset first
    if preset is None and path.suffix != ".safetensors":
        raise RunError(
            f"--upsample-with {spec}: say which upsampler it is, PRESET:CHECKPOINT (e.g. "
            "upsampler64-256:64_256_upsampler.pt), or give a safetensors that carries its flags"
        )
    upsampler = load_upsampler(preset=preset, flag_string=None, checkpoint=path, device=device)
    check_low_res(upsampler, base.image_size, base.in_channels, labels, "the base model's samples")
    try:
        respacing = respacing_for("ddpm", steps, None, upsampler.num_timesteps)
    except RunError as e:
        raise RunError(f"--upsample-steps: {e}") from None
    return Cascade(upsampler, respacing)


def upsample_file_run(
    low_res_path: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None,
    preset: str | None = None,
    flag_string: str | None = None,
    num_samples: int | None = None,
    sampler: str = "ddpm",
    steps: int | None = None,
    respacing: str | None = None,
    eta: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    resume: bool = False,
    engine: str | None = None,
    threads: int | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    clip_denoised: bool = True,
    progress: bool = False,
) -> dict:
    """Super-resolve the npz ``low_res_path`` into the run folder ``out`` (``fastdiff upsample``'s
    options as keywords); returns the run's summary. ``num_samples`` defaults to one per low-res
    image (more cycle through them)."""
    check_arguments(upsample_file_run, locals())
    check_counts(num_samples, batch_size)
    low_res_path, out = Path(low_res_path), Path(out)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    try:  # the file (a sample run's folder names its npz), and the header's count: the batch an
        # exported engine must take is known before any work
        held = len(read_npz(low_res_path, role="--low-res"))
    except EvaluationError as e:
        raise RunError(str(e)) from None
    count = num_samples or held
    batch = min(batch_size, count)
    dev, engine = check_run_options(device, dtype, threads, engine, sampler, eta, seed, batch)
    low_res = read_low_res(low_res_path)
    with locked_run_folder(out, resume, holder="fastdiff upsample"):
        upsampler = load_upsampler(preset=preset, flag_string=flag_string, checkpoint=checkpoint, device=dev)
        check_low_res_file(low_res_path, low_res, upsampler)
        n = num_samples or len(low_res.images)
        plan = upsample_plan(
            upsampler,
            low_res,
            n,
            sampler=sampler,
            respacing=respacing_for(sampler, steps, respacing, upsampler.num_timesteps),
            eta=eta,
            seed=seed,
            batch_size=batch_size,
            dtype=dtype,
            engine=engine,
            device=dev.type,
            clip_denoised=clip_denoised,
        )
        return upsample_run(upsampler, low_res, plan, num_samples=n, out=out, device=dev, progress=progress)
