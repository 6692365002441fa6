"""The work of ``fastdiff train`` and ``fastdiff train-classifier`` (fastdiff.cli.train holds their
options): the checks, the data, the trainer and the locked run folder. A module of its own, imported
when a command runs, so that the commands' --help imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from pathlib import Path

import click

from fastdiff import distributed
from fastdiff.cli.errors import user_error
from fastdiff.files import remove_temp_files
from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.flags import FlagError, as_flag_error, configs_from_flags, flags_of, parse_flags
from fastdiff.models.presets import get_preset
from fastdiff.runs import ranks
from fastdiff.runs.device import (
    check_fp16,
    check_ops_mode,
    choose_threads,
    emulated_bf16,
    emulated_bf16_note,
    resolve_device,
    usable_cores,
)
from fastdiff.runs.folder import check_resume, exclusive_folder
from fastdiff.training import (
    ClassifierTrainer,
    ConfigError,
    DataError,
    DiffusionTrainer,
    TrainConfig,
    TrainingError,
    check_resume_settings,
    dist,
    fit_classifier,
    fit_unet,
    foreign_entries,
    get_mnist,
    latest_checkpoint,
    load_dataset,
    match_classes,
    parse_ema_rates,
    resumable_checkpoint,
    weights_files,
)

WORKERS_PER_CORE = 8

# What a user can fix, shown as one line; anything else (a bare ValueError included) is a bug and
# keeps its traceback.
USER_ERRORS = (ConfigError, FlagError, DataError, CheckpointError, FileNotFoundError, TrainingError)


def _config_and_data(kind: str, o: dict, **extra) -> tuple[TrainConfig, object, str | None]:
    """The run's settings, all checked before any data is read, the dataset they describe, and
    notes for the user (lines) once every check has passed.

    The network is defaults < preset < --flags and --image-size, which must agree where both give
    the size; npz/mnist data keep their own size unless a size was asked for; folders are resized
    to it.
    """
    flags: dict = {}
    sized = o["image_size"] is not None
    if o["preset"]:
        p = get_preset(o["preset"])
        if p.kind != kind:
            raise ConfigError(f"preset {o['preset']!r} is a {p.kind} preset, not a {kind} one")
        flags.update(flags_of(p.net, p.process))
        sized = True
    given = parse_flags(o["flag_string"]) if o["flag_string"] else {}
    if given:
        if o["image_size"] is not None and given.get("image_size", o["image_size"]) != o["image_size"]:
            raise ConfigError(
                f"--image-size {o['image_size']} contradicts --image_size {given['image_size']} in "
                "--flags; give the size once",
                usage=True,
            )
        flags.update(given)
        sized = sized or "image_size" in given
    # guided-diffusion's fp16 training flag, which fit_unet/fit_classifier turn off (fp32 weights)
    fp16_flag = next((f for f in ("use_fp16", "classifier_use_fp16") if given.get(f)), None)
    spelled = {}
    if o["image_size"] is not None:
        flags["image_size"] = o["image_size"]
        spelled["image_size"] = "--image-size"
    net, process = configs_from_flags(kind, flags, spelled, "--flags")  # as `fastdiff sample` checks them
    config = _config(net, process, o, **extra)
    if o["resume"]:
        check_resume_settings(config, kind)
    size = net.image_size if sized or Path(o["data"]).is_dir() else None
    device = ranks.join(resolve_device(o["device"]))  # before the data: the ranks share its scan
    dataset = load_dataset(
        o["data"],
        size,
        channels=net.in_channels,
        skip_bad_images=o["skip_bad_images"],
        mapper=functools.partial(ranks.mapped, "scanning --data"),
    )
    report_skipped(dataset)
    notes = []
    if o["precision"] == "bf16" and emulated_bf16(device):
        notes.append(emulated_bf16_note("--precision bf16"))
    if fp16_flag and o["precision"] != "fp16":
        notes.append(
            f"note: --{fp16_flag} True in --flags does not make fastdiff train in fp16 (the weights stay"
            f" fp32): this run trains in {o['precision']}; --precision fp16 (CUDA) is fp16 autocast"
        )
    if size is not None and not sized:  # guided-diffusion's default size, whatever the images are
        notes.append(
            f"note: the images are resized and center-cropped to {size}x{size}, the default; "
            "--image-size N trains at another size"
        )
    if getattr(dataset, "upscaled", 0):
        notes.append(
            f"note: {dataset.upscaled} of {len(dataset) + len(dataset.skipped)} images are smaller than"
            f" {size}x{size} and are scaled up to it (blurred)"
        )
    if getattr(dataset, "transparent", 0):
        notes.append(
            f"note: {dataset.transparent} of {len(dataset) + len(dataset.skipped)} images have transparency"
            " (an alpha channel or a transparent colour), which is dropped as guided-diffusion drops it:"
            " their transparent pixels train as the colour stored under them"
        )
    return config, dataset, "\n".join(notes) or None


def report_skipped(dataset) -> None:
    """Rank 0's line of the images --skip-bad-images skipped: every rank holds the scan's result
    (each needs the data)."""
    skipped = getattr(dataset, "skipped", ())
    if skipped and distributed.launched_rank() == 0:
        click.echo(f"skipping {len(skipped)} unreadable or corrupt image(s), e.g. {skipped[0]}", err=True)


def _check_options(o: dict) -> None:
    """Cheap checks of the options TrainConfig does not hold, before any data is read or model
    built; then the CPU threads, set before any torch work (under torchrun, this rank's share)."""
    check_ops_mode()
    # as `fastdiff evaluate` checks it ("" too: no device, not the default)
    check_fp16(o["precision"], resolve_device(o["device"]), "--precision")
    if o["image_size"] is not None and o["image_size"] < 1:
        raise ConfigError(f"--image-size must be at least 1, got {o['image_size']}", usage=True)
    most = WORKERS_PER_CORE * usable_cores()
    if o["num_workers"] > most:  # each is a process: far more than the cores only fills memory
        raise ConfigError(
            f"--num-workers must be at most {most} ({WORKERS_PER_CORE} per CPU this process may use),"
            f" got {o['num_workers']}"
        )
    # the main process's intra-op threads; each DataLoader worker is a process of one (torch's)
    choose_threads(o["threads"])


@contextmanager
def locked_out(out: str):
    """Hold ``out`` under an exclusive lock for the run (rank 0 only: the ranks share it)."""
    if distributed.launched_rank() != 0:
        yield
        return
    folder = Path(out)
    with exclusive_folder(folder, "fastdiff training run"):
        for sub in (folder, folder / "samples"):
            remove_temp_files(sub)  # killed writes' leftovers; the lock says no writer of ours runs
        yield


def _check_out(o: dict, kind: str) -> None:
    """Whether --out can take this run, from its small files only."""
    data, out = Path(o["data"]).resolve(), Path(o["out"]).resolve()
    if o["data"] != "mnist" and data.is_dir() and (out == data or data in out.parents):
        # the run's samples/ (and any image it writes) would be read as a class by the next run
        raise ConfigError(f"--out {o['out']} is inside the --data folder {o['data']}; choose another --out")
    if o["resume"]:
        if distributed.launched_rank() == 0:  # another rank's missing --out: not shared (TrainLoop says so)
            check_resume(Path(o["out"]))
        resumable_checkpoint(o["out"], kind, o["max_steps"])
    elif latest_checkpoint(o["out"]) is not None:
        raise ConfigError(
            f"{o['out']} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    elif foreign := foreign_entries(o["out"]):
        # a killed run's own files (no checkpoint yet) are taken over; anything else is not ours
        raise ConfigError(
            f"--out {o['out']} holds files that are no training run's ({foreign[0]}"
            f"{', ...' if len(foreign) > 1 else ''}); choose a new or empty folder"
        )


def _config(net, process, o, **extra) -> TrainConfig:
    """The run's settings: the options named as TrainConfig's fields, and the two that differ."""
    same = {f.name: o[f.name] for f in dataclasses.fields(TrainConfig) if f.name in o}
    same.update(ema=parse_ema_rates(o["ema"]), lr_anneal_steps=o["max_steps"] if o["anneal"] else 0)
    return TrainConfig(net=net, process=process, **same, **extra)


def _fitted(fit, kind: str, net, dataset, *args):
    """``fit``'s network for the data, its size error worded as the flags are (the data's image
    size can leave the preset's channel_mult no level to halve)."""
    try:
        return fit(net, dataset, *args)
    except ConfigError as e:
        raise as_flag_error(e, kind, {"image_size": "the data's image size"}, "--flags") from None


def train_diffusion(o: dict, schedule_sampler, cfg_dropout, random_flip, sample_every, sample_steps) -> None:
    """``fastdiff train`` with its options ``o`` and its own five."""
    try:
        _check_options(o)
        _check_out(o, "diffusion")
        config, dataset, note = _config_and_data(
            "diffusion",
            o,
            schedule_sampler=schedule_sampler,
            cfg_dropout=cfg_dropout,
            random_flip=random_flip,
            sample_every=sample_every,
            sample_steps=sample_steps,
        )
        config = dataclasses.replace(
            config, net=_fitted(fit_unet, "diffusion", config.net, dataset, cfg_dropout)
        )
        trainer = DiffusionTrainer(config, dataset)
    except USER_ERRORS as e:
        raise user_error(e) from e
    _run(trainer, o["out"], note)


def train_classifier(o: dict, val_data, eval_every) -> None:
    """``fastdiff train-classifier`` with its options ``o`` and its own two."""
    try:
        _check_options(o)
        if val_data and not eval_every:
            raise ConfigError("--val-data is only read for --eval-every N; give both")
        if eval_every and not val_data and o["data"] != "mnist":
            raise ConfigError("--eval-every needs --val-data (only mnist has a built-in held-out split)")
        _check_out(o, "classifier")
        config, dataset, note = _config_and_data("classifier", o, eval_every=eval_every)
        config = dataclasses.replace(config, net=_fitted(fit_classifier, "classifier", config.net, dataset))
        val = None
        if val_data:
            val = load_dataset(
                val_data,
                dataset.image_size,
                channels=dataset.channels,
                skip_bad_images=o["skip_bad_images"],
                mapper=functools.partial(ranks.mapped, "scanning --val-data"),
            )
            report_skipped(val)
            match_classes(val, dataset)
        elif eval_every:
            val = get_mnist("val")
        trainer = ClassifierTrainer(config, dataset, val)
    except USER_ERRORS as e:
        raise user_error(e) from e
    _run(trainer, o["out"], note)


def _run(trainer, out: str, note: str | None = None) -> None:
    """Train under ``out``'s lock; rank 0 alone says where the run is, asked before the process
    group is torn down (after it every process calls itself rank 0)."""
    try:
        if note and dist.is_main():
            click.echo(note, err=True)
        names = getattr(trainer.dataset, "class_names", None)
        labelled = trainer.config.net.num_classes is not None  # an unconditional model takes no class
        if dist.is_main() and labelled and names and names != [str(i) for i in range(len(names))]:
            # the ids the folder order gave; --classes takes the names too (they are in the weights)
            click.echo("classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(names)))
        with locked_out(out):
            trainer.run()
        if dist.is_main():
            record = latest_checkpoint(out)
            click.echo(f"done: step {record['step']}, weights {weights_files(out, record)}")
    except (TrainingError, DataError, ConfigError, CheckpointError) as e:  # ConfigError: the lock, resuming
        raise user_error(e) from None
    finally:
        dist.cleanup()
