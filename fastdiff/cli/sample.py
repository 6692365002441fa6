"""``fastdiff sample``: guided sampling to PNGs, a grid and an evaluator-format npz.

Everything that can be wrong with the inputs is checked before the first step runs, and
results are written batch by batch (each batch's npz last), so ``--resume`` after a kill
continues from the last complete batch and reproduces what an uninterrupted run writes:
every batch draws its noise from its own generator seeded by (seed, batch index). The run
folder is locked for the whole run, and run.json records the weights by content, so a resume
never mixes two processes, two models or two sample counts in one npz. Under torchrun the
missing batches are dealt over the ranks and rank 0 owns the folder (fastdiff.cli.ranks).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from fastdiff import distributed
from fastdiff.cli import ranks
from fastdiff.cli.folders import LOCK, exclusive_folder
from fastdiff.cli.loading import (
    LoadedModel,
    check_classifier,
    load_classifier,
    load_diffusion_model,
    same_flags,
)
from fastdiff.diffusion import SAMPLERS, SamplingError
from fastdiff.diffusion.schedule import space_timesteps
from fastdiff.engines import ENGINES, EngineError, check_engine, default_engine
from fastdiff.engines.sampler import DTYPES, Sampler
from fastdiff.files import (
    atomic_write,
    is_temp_file,
    remove_temp_files,
    save_grid,
    save_npz,
    save_png,
    to_uint8,
)


def choose_threads(threads: int | None) -> int:
    """Intra-op threads: ``--threads``, else OMP_NUM_THREADS, else the cores not already busy.

    torch's default (every core) oversubscribes a loaded machine: on a busy 2-core machine the
    same job took 12x the CPU time of one thread. Under torchrun the ranks on one machine share
    its cores, each taking its part; the OMP_NUM_THREADS=1 torchrun sets for every multi-process
    launch is its default, not the user's choice (--threads is).
    """
    local = distributed.local_world_size()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if threads is None and omp.isdigit() and not (local > 1 and omp == "1"):
        threads = int(omp)
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        others = max(0, busy_cores() - (local - 1))  # the sibling ranks starting now are no load
        threads = max(1, (cores - others) // local)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def busy_cores() -> int:
    """Cores other work keeps busy: the 1-minute load average, but only as far as other tasks are
    runnable right now. The average trails by a minute, so a job that has just ended (the previous
    run of a script) would otherwise leave a core idle; a brief task now, on an unloaded
    machine, does not count either."""
    if not hasattr(os, "getloadavg"):
        return 0
    busy = int(os.getloadavg()[0] + 0.5)
    others = runnable_others()
    return busy if others is None else max(0, min(busy, others))


def runnable_others() -> int | None:
    """Runnable tasks besides this one (Linux /proc/loadavg), None where unknown."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.ClickException(f"unknown device '{name}'") from None
    if device.type not in ("cpu", "cuda"):
        raise click.ClickException(f"device '{name}' is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"device '{name}' requested but CUDA is not available")
    return device


def respacing_for(sampler: str, steps: int | None, respacing: str | None, total: int) -> str:
    """``--steps N`` as guided-diffusion users write it: "ddimN" strides for DDIM-style samplers."""
    if respacing is not None and steps is not None:
        raise click.ClickException("give --steps or --respacing, not both")
    if respacing is None:
        spec = SAMPLERS[sampler]
        steps = spec.default_steps if steps is None else steps
        if not 2 <= steps <= total:
            raise click.ClickException(f"--steps must be between 2 and {total}, got {steps}")
        respacing = spec.respacing(steps)
    try:
        kept = space_timesteps(total, respacing)
    except ValueError as e:  # the respacing parser's own checks
        raise click.ClickException(f"respacing '{respacing}': {e}") from None
    if len(kept) < 2:
        raise click.ClickException(f"respacing '{respacing}' keeps {len(kept)} step(s); sampling needs 2")
    return respacing


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
    if not ids:
        raise click.ClickException(f"--classes '{spec}' names no class id")
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise click.ClickException(f"class id {bad[0]} out of range: the model has {num_classes} classes")
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
    engine: str
    clip_denoised: bool
    labels: list[int] | None

    def batches(self, num_samples: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, num_samples)) for s in range(0, num_samples, self.batch_size)]


@contextmanager
def locked_run_folder(out: Path, resume: bool):
    """Hold ``out`` under an exclusive lock for the whole run; refuse a folder that is not ours.

    A folder this call created is removed again if the run fails before writing anything. Under
    torchrun rank 0 holds the lock and the other ranks share its verdict.
    """
    with ExitStack() as held:
        with ranks.agreed("checking --out"):
            if distributed.is_main():
                held.enter_context(_own_run_folder(out, resume))
        yield


@contextmanager
def _own_run_folder(out: Path, resume: bool):
    created = not out.exists()
    with exclusive_folder(out, "fastdiff sample"):
        try:
            if not (out / "run.json").is_file():
                if any(p.name != LOCK and not is_temp_file(p) for p in out.iterdir()):
                    raise click.ClickException(
                        f"--out {out} is not empty and holds no sampling run (no run.json); "
                        "choose a new or empty folder"
                    )
            elif not resume:
                raise click.ClickException(
                    f"{out} already holds a sampling run; pass --resume or choose another --out"
                )
            for folder in (out, out / "images", out / "batches"):
                remove_temp_files(folder)  # the lock guarantees no writer of ours is running
            yield
        except BaseException:
            if created and [p.name for p in out.iterdir()] == [LOCK]:
                (out / LOCK).unlink()
                out.rmdir()
            raise


@contextmanager
def _writing(out: Path):
    """A failed write (full disk, read-only mount) is the machine's state, not a bug: one line."""
    try:
        yield
    except OSError as e:
        raise click.ClickException(f"cannot write to {out}: {e.strerror or e}") from None


def _read_run(run_file: Path) -> dict:
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise click.ClickException(
            f"--resume: {run_file} is unreadable ({e}); choose another --out"
        ) from None
    if not isinstance(old, dict) or not isinstance(old.get("num_samples"), int):
        raise click.ClickException(
            f"--resume: {run_file} is not a fastdiff sampling run; choose another --out"
        )
    return old


# The parallel engine runs the eager step on batch slices (the same samples), so a resume at
# another thread count, which changes the CPU's default engine, continues the same run.
_SAME_SAMPLES_AS = {"parallel": "eager"}


def _differences(old: dict, record: dict) -> list[str]:
    """Names of what differs between two run records; networks are compared by content and flags."""
    diff = []
    for key in ("model", "classifier"):
        a, b = old.get(key), record[key]
        if b is None or not isinstance(a, dict):
            diff += [key] if a != b else []
            continue
        if a.get("sha256") is None:
            diff.append(f"{key} weights (an older fastdiff made this run and did not record them)")
        elif a["sha256"] != b["sha256"]:
            diff.append(f"{key} weights (sha256 {a['sha256'][:12]} vs {b['sha256'][:12]})")
        if not same_flags(a.get("flags"), b["flags"], "classifier" if key == "classifier" else None):
            diff.append(f"{key} flags")
    skip = {"model", "classifier", "labels", "num_samples", "engine"}
    diff += [k for k, v in record.items() if k not in skip and old.get(k) != v]
    engines = [_SAME_SAMPLES_AS.get(e, e) for e in (old.get("engine"), record["engine"])]
    if engines[0] != engines[1]:
        diff.append("engine")
    old_labels, new_labels = old.get("labels"), record["labels"]
    if old_labels is None or new_labels is None:
        same = old_labels is new_labels
    else:
        shared = min(len(old_labels), len(new_labels))
        same = old_labels[:shared] == new_labels[:shared]
    if not same:
        diff.append("classes")
    return diff


def _complete_batches(out: Path, batches: list[tuple[int, int]], plan: Plan, image: tuple) -> set[int]:
    """Batches on disk that are exactly what this plan makes there; a partial last batch of a
    smaller run has another size and is made again."""
    done = set()
    for b, (lo, hi) in enumerate(batches):
        path = out / "batches" / f"batch_{b:05d}.npz"
        if not path.exists():
            continue
        try:
            with np.load(path) as z:
                images = z["arr_0"]
                labels = z["arr_1"].tolist() if "arr_1" in z.files else None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise click.ClickException(
                f"--resume: {path} is unreadable ({e}); delete it to sample that batch again"
            ) from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != image:
            raise click.ClickException(
                f"--resume: {path} holds {images.dtype} images of shape {images.shape[1:]}, "
                f"this run makes uint8 {image}; delete it to sample that batch again"
            )
        if len(images) != hi - lo:
            continue
        if labels != (None if plan.labels is None else plan.labels[lo:hi]):
            raise click.ClickException(
                f"--resume: the labels in {path} are not this run's; delete it to sample that batch again"
            )
        done.add(b)
    return done


def prepare_out_dir(out: Path, plan: Plan, num_samples: int, resume: bool, image: tuple) -> set[int]:
    """Check the (locked) ``out`` against the plan and record the plan; returns the complete batches.

    A resume may ask for more samples than before (the complete batches are kept), never fewer;
    a final npz of another count is removed before anything else is written.
    """
    run_file = out / "run.json"
    record = _record(plan, num_samples)
    done: set[int] = set()
    if run_file.exists():
        old = _read_run(run_file)
        diff = _differences(old, record)
        if diff:
            raise click.ClickException(
                f"--resume: this run differs from the one in {out} in: {', '.join(diff)}"
            )
        if num_samples < old["num_samples"]:
            raise click.ClickException(
                f"--resume: the run in {out} is for {old['num_samples']} samples; --num-samples "
                f"{num_samples} would drop samples it made; pass at least {old['num_samples']} "
                "or choose another --out"
            )
        done = _complete_batches(out, plan.batches(num_samples), plan, image)
    final = final_npz_name(num_samples, image)
    with _writing(out):
        for stale in out.glob("samples_*.npz"):
            if stale.name != final:
                stale.unlink()
        atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return done


def _record(plan: Plan, num_samples: int) -> dict:
    return {**plan.__dict__, "num_samples": num_samples}


def check_same_run(out: Path, plan: Plan, num_samples: int) -> None:
    """What a rank other than 0 checks once rank 0 has recorded the run: it sees the record (the
    folder is one every rank shares) and the record is its own run (the same weights, flags)."""
    run_file = out / "run.json"
    if not run_file.is_file():
        raise click.ClickException(
            f"rank {distributed.rank()} does not see {run_file}, which rank 0 wrote: under torchrun "
            "--out must be a folder every rank shares (a shared file system across machines)"
        )
    old = _read_run(run_file)
    diff = _differences(old, _record(plan, num_samples))
    diff += ["num_samples"] if old["num_samples"] != num_samples else []
    if diff:
        raise click.ClickException(
            f"rank {distributed.rank()}'s run differs from rank 0's in: {', '.join(diff)}"
        )


def final_npz_name(num_samples: int, image: tuple) -> str:
    h, w, c = image
    return f"samples_{num_samples}x{h}x{w}x{c}.npz"


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
    conditioning: Callable[[int, int], dict] | None = None,
) -> dict:
    """Sample every batch not yet on disk, then write the combined npz and the grid.

    ``conditioning(lo, hi)`` gives samples lo..hi's further model inputs (an upsampler's low_res)."""
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
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    image = (loaded.image_size, loaded.image_size, loaded.in_channels)
    done = ranks.decided_by_main(
        "checking --out", lambda: prepare_out_dir(out, plan, num_samples, resume, image)
    )
    with ranks.agreed("checking run.json"):
        if not distributed.is_main():
            check_same_run(out, plan, num_samples)
    batches = plan.batches(num_samples)
    missing = [i for i in range(len(batches)) if i not in done]
    todo = ranks.share(missing)  # any split gives the same files: a batch's noise is its own
    steps = diffusion.num_timesteps
    labels_all = None if plan.labels is None else np.asarray(plan.labels, dtype=np.int64)

    shown = progress and distributed.is_main()
    bar = tqdm(total=len(todo) * steps, unit="step", disable=not shown, desc="sampling")
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
                model_kwargs=None if conditioning is None else conditioning(lo, hi),
            )
            images = to_uint8(x)  # the device->host copy: the batch's one sync
        except SamplingError as e:
            raise click.ClickException(
                f"batch {b} (samples {lo}-{hi - 1}): {e}; nothing of this batch was written"
            ) from None
        except EngineError as e:  # an engine builds its step on the first batch of a size
            raise click.ClickException(str(e)) from None
        written = time.perf_counter()
        sampling += written - start - (sampler.warmup_seconds - warm)
        with _writing(out):
            for i, img in enumerate(images):
                suffix = "" if labels_all is None else f"_class{labels_all[lo + i]}"
                save_png(img, out / "images" / f"{lo + i:06d}{suffix}.png")
            batch_labels = None if y is None else labels_all[lo:hi]
            save_npz(out / "batches" / f"batch_{b:05d}.npz", images, batch_labels)
        writing += time.perf_counter() - written
    bar.close()

    ranks.wait_for_all("sampling")
    start = time.perf_counter()
    if distributed.is_main():
        parts = [np.load(out / "batches" / f"batch_{b:05d}.npz") for b in range(len(batches))]
        images = np.concatenate([p["arr_0"] for p in parts])
        labels = None if labels_all is None else np.concatenate([p["arr_1"] for p in parts])
        n = len(images)
        with _writing(out):
            save_npz(out / final_npz_name(n, image), images, labels)
            save_grid(images[:100], out / "grid.png", ncol=10 if n >= 10 else None)
    ranks.wait_for_all("rank 0 merged the batches")  # what runs next (the cascade) reads the npz
    writing += time.perf_counter() - start
    made = sum(batches[b][1] - batches[b][0] for b in todo)
    summary = {
        "images": made,
        "skipped": num_samples - sum(batches[b][1] - batches[b][0] for b in missing),
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
    return ranks.combined(summary)


def check_run_options(
    device: str, dtype: str, threads: int | None, engine: str | None, sampler: str, eta: float
) -> tuple[torch.device, str]:
    """(device, engine) after the checks every sampling command makes before loading anything;
    under torchrun, this rank's device in the process group."""
    dev = ranks.join(resolve_device(device))
    if dtype == "fp16" and dev.type == "cpu":
        raise click.ClickException("--dtype fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    choose_threads(threads)
    engine = engine or default_engine(dev)
    try:
        check_engine(engine, dev)
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    if eta and not SAMPLERS[sampler].uses_eta:
        raise click.ClickException(f"--eta is a DDIM parameter; --sampler {sampler} does not use it")
    if eta < 0:
        raise click.ClickException(f"--eta must be >= 0, got {eta}")
    return dev, engine


def summary_line(s: dict) -> str:
    """What a sampling command prints when it is done: counts, timings, where it ran."""
    group = f" x {s['ranks']} ranks" if s.get("ranks", 1) > 1 else ""
    return (
        f"{s['images']} images ({s['skipped']} already there) in {s['seconds']:.1f} s sampling "
        f"(+{s['warmup_s']:.1f} s warm-up/capture, {s['writing_s']:.1f} s writing): "
        f"{s['images_per_s']:.2f} images/s, {s['s_per_step']:.4f} s/step ({s['steps']} steps), "
        f"device {s['device']}, dtype {s['dtype']}, engine {s['engine']}, {s['threads']} threads"
        f"{group} -> {s['out']}"
    )


def runtime_options(command):
    """How and where a sampling command runs: --engine, --threads, --dtype, --device,
    --clip-denoised, --progress (the same options for sample and upsample)."""
    options = [
        click.option(
            "--engine",
            type=click.Choice(list(ENGINES)),
            default=None,
            help="How the guided step runs (default: graph on CUDA; on the CPU parallel with more than "
            "one thread, else eager).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="CPU threads (default: OMP_NUM_THREADS, else the cores not already busy).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPES)),
            default="fp32",
            show_default=True,
            help="Compute dtype: the networks cast once (GroupNorm statistics stay fp32).",
        ),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
        click.option(
            "--clip-denoised/--no-clip-denoised",
            default=True,
            show_default=True,
            help="Clip x0 predictions to [-1, 1].",
        ),
        click.option(
            "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
@runtime_options
@click.option(
    "--upsample-with",
    metavar="[PRESET:]CHECKPOINT",
    default=None,
    help="Then super-resolve the samples with this upsampler (e.g. upsampler64-256:64_256_upsampler.pt; "
    "a safetensors with its own flags needs no preset) into OUT/upsampled, as fastdiff upsample does.",
)
@click.option("--upsample-steps", type=int, default=None, help="The upsampler's DDPM steps (default: 250).")
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
    upsample_with,
    upsample_steps,
):
    """Sample images with classifier or classifier-free guidance.

    With no model options, the bundled MNIST model and its classifier are used.
    """
    dev, engine = check_run_options(device, dtype, threads, engine, sampler, eta)
    if classifier_scale is not None and classifier_scale < 0:
        raise click.ClickException(f"--classifier-scale must be >= 0, got {classifier_scale}")
    if classifier is not None and classifier_scale is None:
        raise click.ClickException(
            "--classifier needs --classifier-scale S (the guidance strength, e.g. 1.0; 0 for none)"
        )
    with locked_run_folder(out, resume):
        bundled = preset is None and flag_string is None and checkpoint is None
        loaded = load_diffusion_model(
            preset=preset, flag_string=flag_string, checkpoint=checkpoint, device=dev
        )
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
        if clf is not None:
            check_classifier(loaded, clf)
        if classifier_scale and clf is None:
            raise click.ClickException("--classifier-scale needs a classifier (--classifier PATH)")
        if cfg_scale is not None and loaded.null_label is None:
            raise click.ClickException(
                "--cfg-scale needs a model trained with a null label (classifier-free guidance)"
            )
        num_classes = (
            loaded.num_real_classes
            if loaded.class_cond
            else (clf.num_real_classes if clf is not None else None)
        )
        labels = parse_classes(classes, num_classes, num_samples, seed)
        cascade = None
        if upsample_with is not None:
            from fastdiff.cli.upsample import prepare_cascade

            cascade = prepare_cascade(upsample_with, loaded, labels, upsample_steps, dev)
        elif upsample_steps is not None:
            raise click.ClickException("--upsample-steps needs --upsample-with (the upsampler)")
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
            engine=engine,
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
        ranks.echo(summary_line(summary))
        if cascade is not None:
            image = (loaded.image_size, loaded.image_size, loaded.in_channels)
            npz = out / final_npz_name(num_samples, image)
            summary = cascade.run(out, npz, plan, resume=resume, device=dev, progress=progress)
            ranks.echo(f"upsampled: {summary_line(summary)}")
