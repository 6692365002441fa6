"""``fastdiff sample``: guided sampling to PNGs, a grid and an evaluator-format npz.

Everything that can be wrong with the inputs is checked before the first step runs, and
results are written batch by batch (each batch's npz last), so ``--resume`` after a kill
continues from the last complete batch and reproduces what an uninterrupted run writes:
every batch draws its noise from its own generator seeded by (seed, batch index).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from fastdiff.cli.loading import LoadedModel, load_classifier, load_diffusion_model
from fastdiff.diffusion import SAMPLERS, SamplingError
from fastdiff.engines import ENGINES, EngineError, check_engine, default_engine
from fastdiff.engines.sampler import DTYPES, Sampler
from fastdiff.imageio import atomic_write, save_grid, save_npz, save_png, to_uint8


def choose_threads(threads: int | None) -> int:
    """Intra-op threads: ``--threads``, else OMP_NUM_THREADS, else the cores not already busy.

    torch's default (every core) oversubscribes a loaded machine: on a busy 2-core machine the
    same job took 12x the CPU time of one thread.
    """
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
        threads = max(1, cores - busy)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.ClickException(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"device '{name}' requested but CUDA is not available")
    return device


def respacing_for(sampler: str, steps: int | None, respacing: str | None, total: int) -> str:
    """``--steps N`` as guided-diffusion users write it: "ddimN" strides for DDIM-style samplers."""
    if respacing is not None and steps is not None:
        raise click.ClickException("give --steps or --respacing, not both")
    if respacing is not None:
        return respacing
    spec = SAMPLERS[sampler]
    steps = spec.default_steps if steps is None else steps
    if not 1 <= steps <= total:
        raise click.ClickException(f"--steps must be between 1 and {total}, got {steps}")
    return spec.respacing(steps)


def parse_classes(spec: str | None, num_classes: int | None, n: int, seed: int) -> np.ndarray | None:
    """Labels for ``n`` samples: a list cycled, ``uniform`` (equal counts) or ``random``."""
    if num_classes is None:
        if spec is not None:
            raise click.ClickException(
                "--classes given, but neither the model nor a classifier is class-aware"
            )
        return None
    spec = spec or "uniform"
    if spec == "uniform":
        return np.arange(n, dtype=np.int64) % num_classes
    if spec == "random":
        return np.random.default_rng(seed).integers(0, num_classes, size=n, dtype=np.int64)
    try:
        ids = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise click.ClickException(
            f"--classes must be ids like 1,207,360 or 'uniform' or 'random', got '{spec}'"
        ) from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise click.ClickException(
            f"class id {bad[0] if bad else spec} out of range: the model has {num_classes} classes"
        )
    return np.resize(np.asarray(ids, dtype=np.int64), n)


@dataclass
class Plan:
    """What a run produces; stored as run.json so --resume can refuse a different run."""

    model: dict
    classifier: dict | None
    classifier_scale: float
    cfg_scale: float | None
    sampler: str
    respacing: str
    eta: float
    seed: int
    batch_size: int
    dtype: str
    clip_denoised: bool
    labels: list[int] | None

    def batches(self, num_samples: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, num_samples)) for s in range(0, num_samples, self.batch_size)]


def prepare_out_dir(out: Path, plan: Plan, num_samples: int, resume: bool) -> set[int]:
    """Check ``out`` against the plan; returns the batch indices already complete."""
    run_file = out / "run.json"
    done = {int(p.stem.split("_")[1]) for p in (out / "batches").glob("batch_*.npz")}
    record = {**plan.__dict__, "num_samples": num_samples}
    if run_file.exists():
        if not resume:
            raise click.ClickException(
                f"{out} already holds a sampling run; pass --resume or choose another --out"
            )
        old = json.loads(run_file.read_text())
        old_labels, new_labels = old.pop("labels"), record["labels"]
        old.pop("num_samples", None)
        diff = [k for k, v in old.items() if record.get(k) != v]
        shared = min(len(old_labels or []), len(new_labels or []))
        if old_labels is not None and new_labels is not None and old_labels[:shared] != new_labels[:shared]:
            diff.append("classes")
        if diff:
            raise click.ClickException(
                f"--resume: this run differs from the one in {out} in: {', '.join(diff)}"
            )
    elif done:
        raise click.ClickException(f"{out}/batches has samples but no run.json; choose another --out")
    atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return done


def _batch_generator(device: torch.device, seed: int, index: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % (2**63))
    return g


def run_sampling(
    loaded: LoadedModel,
    classifier: LoadedModel | None,
    plan: Plan,
    *,
    num_samples: int,
    out: Path,
    resume: bool,
    engine: str,
    device: torch.device,
    progress: bool,
) -> dict:
    """Sample every batch not yet on disk, then write the combined npz and the grid."""
    from tqdm.auto import tqdm

    diffusion = loaded.diffusion(plan.respacing)
    try:
        sampler = Sampler(
            loaded.model,
            diffusion,
            sampler=plan.sampler,
            eta=plan.eta,
            classifier=None if classifier is None else classifier.model,
            classifier_scale=plan.classifier_scale,
            cfg_scale=plan.cfg_scale,
            null_label=loaded.null_label,
            engine=engine,
            dtype=plan.dtype,
            device=device,
            clip_denoised=plan.clip_denoised,
            image_shape=(loaded.in_channels, loaded.image_size, loaded.image_size),
        )
    except (EngineError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    done = prepare_out_dir(out, plan, num_samples, resume)
    batches = plan.batches(num_samples)
    todo = [i for i in range(len(batches)) if i not in done]
    steps = diffusion.num_timesteps
    labels_all = None if plan.labels is None else np.asarray(plan.labels, dtype=np.int64)

    bar = tqdm(total=len(todo) * steps, unit="step", disable=not progress, desc="sampling")
    sampling = writing = 0.0
    for b in todo:
        lo, hi = batches[b]
        y = None if labels_all is None else torch.as_tensor(labels_all[lo:hi], device=device)
        warm = sampler.warmup_seconds
        start = time.perf_counter()
        try:
            x = sampler(
                y,
                num_samples=hi - lo,
                generator=_batch_generator(device, plan.seed, b),
                callback=lambda *_: bar.update(1),
            )
            images = to_uint8(x)  # the device->host copy: the batch's one sync
        except SamplingError as e:
            raise click.ClickException(
                f"batch {b} (samples {lo}-{hi - 1}): {e}; nothing of this batch was written"
            ) from None
        written = time.perf_counter()
        sampling += written - start - (sampler.warmup_seconds - warm)
        for i, img in enumerate(images):
            suffix = "" if labels_all is None else f"_class{labels_all[lo + i]}"
            save_png(img, out / "images" / f"{lo + i:06d}{suffix}.png")
        save_npz(out / "batches" / f"batch_{b:05d}.npz", images, None if y is None else labels_all[lo:hi])
        writing += time.perf_counter() - written
    bar.close()

    start = time.perf_counter()
    parts = [np.load(out / "batches" / f"batch_{b:05d}.npz") for b in range(len(batches))]
    images = np.concatenate([p["arr_0"] for p in parts])
    labels = None if labels_all is None else np.concatenate([p["arr_1"] for p in parts])
    n, h, w, c = images.shape
    save_npz(out / f"samples_{n}x{h}x{w}x{c}.npz", images, labels)
    save_grid(images[:100], out / "grid.png", ncol=10 if n >= 10 else None)
    writing += time.perf_counter() - start
    made = sum(batches[b][1] - batches[b][0] for b in todo)
    return {
        "images": made,
        "skipped": num_samples - made,
        "warmup_s": sampler.warmup_seconds,
        "seconds": sampling,
        "writing_s": writing,
        "images_per_s": made / sampling if made and sampling > 0 else 0.0,
        "s_per_step": sampling / (len(todo) * steps) if todo else 0.0,
        "steps": steps,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": plan.dtype,
        "engine": sampler.engine,
        "threads": torch.get_num_threads(),
        "out": str(out),
    }


@click.command("sample")
@click.option(
    "--preset", help="Named model preset (see `fastdiff presets`); with --checkpoint for its weights."
)
@click.option(
    "--flags",
    "flag_string",
    help='guided-diffusion model flags, e.g. "--image_size 64 --class_cond True ...".',
)
@click.option(
    "--checkpoint", type=click.Path(path_type=Path), help="Diffusion model weights (.pt or .safetensors)."
)
@click.option(
    "--classifier", type=click.Path(path_type=Path), help="Noisy-image classifier weights for guidance."
)
@click.option(
    "--classifier-preset", help="Classifier preset (default: the one matching the model's image size)."
)
@click.option("--classifier-flags", help="guided-diffusion classifier flags, instead of --classifier-preset.")
@click.option("--classifier-scale", type=float, default=None, help="Classifier guidance scale s (0: none).")
@click.option(
    "--cfg-scale",
    type=float,
    default=None,
    help="Classifier-free guidance weight w (model needs a null label).",
)
@click.option(
    "--sampler", type=click.Choice(list(SAMPLERS)), default="ddim", show_default=True, help="Sampling method."
)
@click.option("--steps", type=int, default=None, help="Sampling steps (ddim: 25, ddpm: 250, dpm++2m: 20).")
@click.option(
    "--respacing",
    default=None,
    help='guided-diffusion respacing string instead of --steps ("ddim25", "250").',
)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta (0: deterministic).")
@click.option(
    "--classes", default=None, help="Class ids like 1,207,360 (cycled), 'uniform' (equal counts) or 'random'."
)
@click.option(
    "--num-samples", type=click.IntRange(min=1), default=16, show_default=True, help="Images to make."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per batch."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same images."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("samples"),
    show_default=True,
    help="Output folder.",
)
@click.option("--resume", is_flag=True, help="Continue a killed run in --out from its last complete batch.")
@click.option(
    "--engine",
    type=click.Choice(list(ENGINES)),
    default=None,
    help="How the guided step runs (default: graph on CUDA, eager on the CPU).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads (default: OMP_NUM_THREADS, else the cores not already busy).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default="fp32",
    show_default=True,
    help="Compute dtype (autocast).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option(
    "--clip-denoised/--no-clip-denoised",
    default=True,
    show_default=True,
    help="Clip x0 predictions to [-1, 1].",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def sample_command(
    preset,
    flag_string,
    checkpoint,
    classifier,
    classifier_preset,
    classifier_flags,
    classifier_scale,
    cfg_scale,
    sampler,
    steps,
    respacing,
    eta,
    classes,
    num_samples,
    batch_size,
    seed,
    out,
    resume,
    engine,
    threads,
    dtype,
    device,
    clip_denoised,
    progress,
):
    """Sample images with classifier or classifier-free guidance.

    With no model options, the bundled MNIST model and its classifier are used.
    """
    dev = resolve_device(device)
    if dtype == "fp16" and dev.type == "cpu":
        raise click.ClickException("--dtype fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    engine = engine or default_engine(dev)
    try:
        check_engine(engine, dev)
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    if eta and not SAMPLERS[sampler].uses_eta:
        raise click.ClickException(f"--eta is a DDIM parameter; --sampler {sampler} does not use it")
    if eta < 0:
        raise click.ClickException(f"--eta must be >= 0, got {eta}")
    choose_threads(threads)
    bundled = preset is None and flag_string is None and checkpoint is None
    loaded = load_diffusion_model(preset=preset, flag_string=flag_string, checkpoint=checkpoint, device=dev)
    if bundled and classifier is None and classifier_preset is None and classifier_flags is None:
        clf = loaded.bundled_classifier(dev)
        if classifier_scale is None and cfg_scale is None and clf is not None:
            classifier_scale = loaded.default_classifier_scale
    elif classifier is not None:
        clf = load_classifier(
            classifier,
            preset=classifier_preset,
            flag_string=classifier_flags,
            image_size=loaded.image_size,
            device=dev,
        )
    else:
        if classifier_preset or classifier_flags:
            raise click.ClickException(
                "--classifier-preset/--classifier-flags need --classifier (the weights)"
            )
        clf = None
    if classifier_scale and clf is None:
        raise click.ClickException("--classifier-scale needs a classifier (--classifier PATH)")
    if cfg_scale is not None and loaded.null_label is None:
        raise click.ClickException(
            "--cfg-scale needs a model trained with a null label (classifier-free guidance)"
        )
    num_classes = loaded.num_classes if loaded.class_cond else (clf.num_classes if clf is not None else None)
    labels = parse_classes(classes, num_classes, num_samples, seed)
    plan = Plan(
        model=loaded.identity,
        classifier=None if clf is None else clf.identity,
        classifier_scale=float(classifier_scale or 0.0),
        cfg_scale=cfg_scale,
        sampler=sampler,
        respacing=respacing_for(sampler, steps, respacing, loaded.num_timesteps),
        eta=eta,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        clip_denoised=clip_denoised,
        labels=None if labels is None else labels.tolist(),
    )
    summary = run_sampling(
        loaded,
        clf if plan.classifier_scale else None,
        plan,
        num_samples=num_samples,
        out=out,
        resume=resume,
        engine=engine,
        device=dev,
        progress=progress,
    )
    s = summary
    click.echo(
        f"{s['images']} images ({s['skipped']} already there) in {s['seconds']:.1f} s sampling "
        f"(+{s['warmup_s']:.1f} s warm-up/capture, {s['writing_s']:.1f} s writing): "
        f"{s['images_per_s']:.2f} images/s, {s['s_per_step']:.4f} s/step ({s['steps']} steps), "
        f"device {s['device']}, dtype {s['dtype']}, engine {s['engine']}, {s['threads']} threads "
        f"-> {s['out']}"
    )
