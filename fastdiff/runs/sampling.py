"""The batch loop of a sampling run: every batch not yet on disk, sampled and written in turn,
then the batches merged into the final npz and grid.

Every batch draws its noise from its own generator seeded by (seed, batch index), so a resume
after a kill, and any split over torchrun's ranks, writes what one uninterrupted run writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from fastdiff import distributed
from fastdiff.diffusion import SamplingError
from fastdiff.engines import CACHED_BUILDS, EngineError
from fastdiff.engines.sampler import Sampler
from fastdiff.files import to_uint8
from fastdiff.runs import ranks
from fastdiff.runs.device import note_emulated_bf16
from fastdiff.runs.errors import RunError
from fastdiff.runs.loading import LoadedModel
from fastdiff.runs.plan import Plan
from fastdiff.runs.record import check_same_run, prepare_out_dir
from fastdiff.runs.writer import merge_batches, write_batch


def batch_generator(device: torch.device, seed: int, index: int) -> torch.Generator:
    """Batch ``index``'s own noise: the same for any resume, split or batch order."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % (2**63))
    return g


def make_sampler(
    loaded: LoadedModel,
    respacing: str,
    *,
    engine: str,
    dtype: str,
    device: torch.device,
    sampler: str = "ddim",
    eta: float = 0.0,
    classifier: LoadedModel | None = None,
    classifier_scale: float = 0.0,
    cfg_scale: float | None = None,
    clip_denoised: bool = True,
) -> Sampler:
    """The Sampler of a loaded model (and classifier); an engine that cannot run here is a RunError."""
    try:
        return Sampler(
            loaded.model,
            loaded.diffusion(respacing),
            sampler=sampler,
            eta=eta,
            classifier=None if classifier is None else classifier.model,
            classifier_scale=classifier_scale,
            cfg_scale=cfg_scale,
            null_label=loaded.null_label,
            engine=engine,
            dtype=dtype,
            device=device,
            clip_denoised=clip_denoised,
            image_shape=(loaded.in_channels, loaded.image_size, loaded.image_size),
        )
    except EngineError as e:
        raise RunError(str(e)) from None


T = TypeVar("T")


def main_builds_first(engine: str, build: Callable[[], T]) -> T:
    """``build()``; under torchrun, when the engine's build is a cached file (the ONNX export,
    the TensorRT engine), rank 0 runs it alone while the other ranks wait, and they run it after
    (loading that file) instead of every rank exporting the same graph at once (minutes each, or
    a TensorRT build per GPU). Rank 0's failure is every rank's one line (ranks.agreed)."""
    if not distributed.is_initialized() or engine not in CACHED_BUILDS:
        return build()
    with ranks.agreed("building the engine"):
        if distributed.is_main():
            try:
                built = build()
            except EngineError as e:
                raise RunError(str(e)) from None
    return built if distributed.is_main() else build()


def built_once(sampler: Sampler, n: int, model_kwargs: dict | None = None) -> None:
    """Under torchrun, the step for batches of ``n`` built (and warmed up, as a first batch
    would) before the batches, by rank 0 first (:func:`main_builds_first`). Without torchrun the
    first batch builds it."""

    def build() -> None:  # the other ranks load the file at their first batch, if they have one
        if distributed.is_main():
            sampler.warmup(None, n, model_kwargs)

    if distributed.is_initialized() and sampler.engine in CACHED_BUILDS:
        main_builds_first(sampler.engine, build)


def plan_sampler(loaded: LoadedModel, classifier: LoadedModel | None, plan: Plan, device) -> Sampler:
    """The Sampler a plan describes."""
    return make_sampler(
        loaded,
        plan.respacing,
        engine=plan.engine,
        dtype=plan.dtype,
        device=device,
        sampler=plan.sampler,
        eta=plan.eta,
        classifier=classifier,
        classifier_scale=plan.classifier_scale,
        cfg_scale=plan.cfg_scale,
        clip_denoised=plan.clip_denoised,
    )


def recorded(
    out: Path, plan: Plan, num_samples: int, image: tuple, kept: Callable[[set[int]], None] | None = None
) -> set[int]:
    """The complete batches of ``plan``'s run in the (locked) ``out``, on every rank: rank 0
    checks the folder and records the run (record.prepare_out_dir), ``kept(done)`` may refuse the
    batches kept, and every other rank then checks that rank 0's record is its own run."""

    def prepare() -> set[int]:
        done = prepare_out_dir(out, plan, num_samples, image)
        if kept is not None:
            kept(done)
        return done

    done = ranks.decided_by_main("checking --out", prepare)
    with ranks.agreed("checking run.json"):
        if not distributed.is_main():
            check_same_run(out, plan, num_samples)
    return done


def run_sampling(
    loaded: LoadedModel,
    classifier: LoadedModel | None,
    plan: Plan,
    *,
    num_samples: int,
    out: Path,
    device: torch.device,
    progress: bool = False,
    conditioning: Callable[[int, int], dict] | None = None,
    sampler: Sampler | None = None,
) -> dict:
    """Sample every batch not yet in the (locked, see folder.locked_run_folder) ``out``, then
    write the combined npz and the grid; returns the run's summary (counts, timings, engine).

    ``conditioning(lo, hi)`` gives samples lo..hi's further model inputs (an upsampler's low_res);
    ``sampler`` is the plan's own Sampler when the caller has built it (else built here)."""
    from fastdiff.progress import progress_bar

    if sampler is None:
        sampler = plan_sampler(loaded, classifier, plan, device)
    image = (loaded.image_size, loaded.image_size, loaded.in_channels)
    done = recorded(out, plan, num_samples, image)
    batches = plan.batches(num_samples)
    missing = [i for i in range(len(batches)) if i not in done]
    todo = ranks.share(missing)  # any split gives the same files: a batch's noise is its own
    if missing:
        note_emulated_bf16(sampler.dtype, sampler.device)
        lo, hi = batches[missing[0]]
        built_once(sampler, hi - lo, None if conditioning is None else conditioning(lo, hi))
    steps = sampler.diffusion.num_timesteps
    labels_all = None if plan.labels is None else np.asarray(plan.labels, dtype=np.int64)
    # The labels are written either way; an unconditional model whose classifier has scale 0
    # (classifier_sample.py's unguided baseline) samples without them.
    labelled = labels_all is not None and sampler.needs_labels

    shown = progress and distributed.is_main()
    sampling = writing = 0.0
    # closed however the loop ends, so an interrupt's message starts its own line
    with progress_bar(total=len(todo) * steps, unit="step", disable=not shown, desc="sampling") as bar:
        for b in todo:
            lo, hi = batches[b]
            y = torch.as_tensor(labels_all[lo:hi], device=device) if labelled else None
            warm = sampler.warmup_seconds
            start = time.perf_counter()
            try:
                x = sampler(
                    y,
                    num_samples=hi - lo,
                    generator=batch_generator(device, plan.seed, b),
                    callback=lambda *_: bar.update(1),
                    model_kwargs=None if conditioning is None else conditioning(lo, hi),
                )
                images = to_uint8(x)  # the device->host copy: the batch's one sync
            except SamplingError as e:
                raise RunError(
                    f"batch {b} (samples {lo}-{hi - 1}): {e}; nothing of this batch was written"
                ) from None
            except EngineError as e:  # an engine builds its step on the first batch of a size
                raise RunError(str(e)) from None
            written = time.perf_counter()
            sampling += written - start - (sampler.warmup_seconds - warm)
            write_batch(out, b, lo, images, None if labels_all is None else labels_all[lo:hi])
            writing += time.perf_counter() - written

    ranks.wait_for_all("sampling")
    start = time.perf_counter()
    if distributed.is_main():
        merge_batches(out, batches, image, labelled=labels_all is not None)
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
