"""``sample_run``: a whole guided-sampling run from Python, as ``fastdiff sample`` runs it.

Everything that can be wrong with the inputs is checked before the first step runs (a RunError
naming it), results are written batch by batch into a locked run folder, and ``resume=True``
after a kill continues from the last complete batch, reproducing what an uninterrupted run
writes. run.json records the weights by content, so a resume never mixes two processes, two
models or two sample counts in one npz. Under torchrun the missing batches are dealt over the
ranks and rank 0 owns the folder (fastdiff.runs.ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from fastdiff.runs.device import check_run_options
from fastdiff.runs.errors import RunError, check_arguments
from fastdiff.runs.folder import locked_run_folder
from fastdiff.runs.loading import check_classifier, load_classifier, load_diffusion_model
from fastdiff.runs.plan import Plan, check_counts, parse_classes, respacing_for
from fastdiff.runs.sampling import run_sampling
from fastdiff.runs.writer import final_npz_name


def sample_run(
    out: str | Path,
    *,
    num_samples: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    resume: bool = False,
    preset: str | None = None,
    flag_string: str | None = None,
    checkpoint: str | Path | None = None,
    classifier: str | Path | None = None,
    classifier_preset: str | None = None,
    classifier_flags: str | None = None,
    classifier_scale: float | None = None,
    cfg_scale: float | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    respacing: str | None = None,
    eta: float = 0.0,
    classes: str | None = None,
    engine: str | None = None,
    threads: int | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    clip_denoised: bool = True,
    progress: bool = False,
    upsample_with: str | None = None,
    upsample_steps: int | None = None,
    report: Callable[[str, dict], None] | None = None,
) -> dict:
    """Sample ``num_samples`` images into the run folder ``out`` and return the run's summary.

    The arguments are ``fastdiff sample``'s options (without ``preset``, ``flag_string`` or
    ``checkpoint``: the bundled MNIST model and its classifier). ``report(stage, summary)`` hears
    each stage as it ends ("sample", then "upsample" with ``upsample_with``), before the next one
    starts; the last summary is returned.
    """
    check_arguments(sample_run, locals())
    check_counts(num_samples, batch_size)
    out = Path(out)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    classifier = None if classifier is None else Path(classifier)
    for name, scale in (("--classifier-scale", classifier_scale), ("--cfg-scale", cfg_scale)):
        if scale is not None and not math.isfinite(scale):
            raise RunError(f"{name} must be a finite number, got {scale}", usage=True)
    if classifier_scale is not None and classifier_scale < 0:
        raise RunError(f"--classifier-scale must be >= 0, got {classifier_scale}", usage=True)
    batch = min(batch_size, num_samples)
    dev, engine = check_run_options(device, dtype, threads, engine, sampler, eta, seed, batch)
    if classifier is not None and classifier_scale is None:
        raise RunError(
            "--classifier needs --classifier-scale S (the guidance strength, e.g. 1.0; 0 for none)"
        )
    if classifier is None and (classifier_preset or classifier_flags):
        raise RunError("--classifier-preset/--classifier-flags need --classifier (the weights)")
    if upsample_steps is not None and upsample_with is None:
        raise RunError("--upsample-steps needs --upsample-with (the upsampler)")
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
            clf = None
        if clf is not None:
            check_classifier(loaded, clf)
        if classifier_scale and clf is None:
            raise RunError("--classifier-scale needs a classifier (--classifier PATH)")
        if cfg_scale is not None and loaded.null_label is None:
            raise RunError("--cfg-scale needs a model trained with a null label (classifier-free guidance)")
        labelled = loaded if loaded.class_cond else clf
        num_classes = None if labelled is None else labelled.num_real_classes
        names = None if labelled is None else labelled.class_names
        labels = parse_classes(classes, num_classes, num_samples, seed, names)
        cascade = None
        if upsample_with is not None:
            from fastdiff.runs.upsample import prepare_cascade

            cascade = prepare_cascade(upsample_with, loaded, labels, upsample_steps, dev)
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
            device=dev.type,
            clip_denoised=clip_denoised,
            labels=None if labels is None else labels.tolist(),
        )
        if cascade is not None and resume:
            cascade.check_resume(out, plan)
        summary = run_sampling(
            loaded,
            clf if plan.classifier_scale else None,
            plan,
            num_samples=num_samples,
            out=out,
            device=dev,
            progress=progress,
        )
        if report is not None:
            report("sample", summary)
        if cascade is not None:
            image = (loaded.image_size, loaded.image_size, loaded.in_channels)
            npz = out / final_npz_name(num_samples, image)
            summary = cascade.run(out, npz, plan, resume=resume, device=dev, progress=progress)
            if report is not None:
                report("upsample", summary)
    return summary
