"""What ``fastdiff invert`` and ``fastdiff interpolate`` share: the model and deterministic DDIM
(eta 0) that runs it, so a latent always gives the same image; a class option checked against
the model; and their batches dealt over the ranks round by round (fastdiff.runs.ranks), rank 0
alone taking each batch's result, so the files are one process's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff import distributed
from fastdiff.diffusion import SamplingError
from fastdiff.engines import EngineError
from fastdiff.engines.sampler import Sampler
from fastdiff.runs import ranks
from fastdiff.runs.device import check_run_options, note_emulated_bf16
from fastdiff.runs.errors import RunError, check_arguments
from fastdiff.runs.loading import LoadedModel, load_diffusion_model
from fastdiff.runs.plan import class_ids, respacing_for
from fastdiff.runs.sampling import built_once, make_sampler


@dataclass(frozen=True)
class DDIMOptions:
    """The model and how deterministic DDIM (eta 0) runs it, as invert and interpolate take them."""

    preset: str | None = None
    flag_string: str | None = None
    checkpoint: str | Path | None = None
    steps: int | None = None
    respacing: str | None = None
    cfg_scale: float | None = None
    engine: str | None = None
    threads: int | None = None
    dtype: str = "fp32"
    device: str = "auto"

    def __post_init__(self):
        check_arguments(DDIMOptions, vars(self))
        if self.cfg_scale is not None and not math.isfinite(self.cfg_scale):
            raise RunError(f"--cfg-scale must be a finite number, got {self.cfg_scale}", usage=True)


def setup(options: DDIMOptions) -> tuple[LoadedModel, Sampler, torch.device, str]:
    """(loaded model, Sampler: DDIM eta 0 with CFG if asked, device, respacing), every option checked."""
    o = options
    dev, engine = check_run_options(o.device, o.dtype, o.threads, o.engine, "ddim", 0.0)  # joins the ranks
    with ranks.agreed("loading the model"):  # weights one node lacks stop every rank
        loaded = load_diffusion_model(
            preset=o.preset, flag_string=o.flag_string, checkpoint=o.checkpoint, device=dev
        )
        if o.cfg_scale is not None and loaded.null_label is None:
            raise RunError("--cfg-scale needs a model trained with a null label")
        respacing = respacing_for("ddim", o.steps, o.respacing, loaded.num_timesteps)
        sampler = make_sampler(
            loaded,
            respacing,
            engine=engine,
            dtype=o.dtype,
            device=dev,
            cfg_scale=o.cfg_scale,
            clip_denoised=True,
        )
    return loaded, sampler, dev, respacing


def check_class(loaded: LoadedModel, label: int | str | None, what: str) -> int | None:
    """A class id, or one of the class names the model's training data gave it."""
    if label is None:
        return None
    if not loaded.class_cond:
        raise RunError(f"{what} given, but the model is not class-conditional")
    if isinstance(label, str):
        ids = class_ids(label, names=loaded.class_names, option=what)
        if len(ids) != 1:
            raise RunError(f"{what} takes one class, got '{label}'")
        label = ids[0]
    if not 0 <= label < loaded.num_real_classes:
        raise RunError(f"{what} {label} out of range: the model has {loaded.num_real_classes} classes")
    return label


def dealt(
    sampler: Sampler,
    batches: list[tuple[int, int]],
    work,
    take,
    what: str,
    *,
    passes: int = 1,
    progress: bool = False,
    desc: str = "sampling",
) -> None:
    """``work(lo, hi, step)`` for each of ``batches``, dealt over the ranks round by round (rank k
    makes the k-th batch of each round), and on rank 0 (without torchrun: this process)
    ``take(lo, hi, result)`` for each batch in batch order while the next round is made: rank 0
    holds a round's results, not the run's. A failure on any rank, ``take``'s on rank 0
    included, ends every rank at the end of its round (ranks.agreed); ``what`` names the items
    in its line. ``step`` is the Sampler's callback for each of the ``passes`` DDIM loops a
    batch runs: with ``progress``, rank 0's bar counts its steps, as a sampling run's does."""
    from fastdiff.progress import progress_bar

    def run(lo: int, hi: int, step):
        try:
            return work(lo, hi, step)
        except SamplingError as e:  # huge latents overflow: the user's input, as in fastdiff sample
            raise RunError(f"{what} {lo}-{hi - 1}: {e}; nothing was written") from None
        except EngineError as e:  # an engine builds its step on the first batch of a size
            raise RunError(str(e)) from None

    if batches:  # rank 0 exports a cached graph, the others load it
        note_emulated_bf16(sampler.dtype, sampler.device)
        built_once(sampler, batches[0][1] - batches[0][0])
    world, rank = distributed.world_size(), distributed.rank()
    rounds = [batches[i : i + world] for i in range(0, len(batches), world)]
    steps = passes * sampler.diffusion.num_timesteps * sum(rank < len(batch) for batch in rounds)
    shown = progress and distributed.is_main()
    made: list = []  # rank 0's: the round before, each batch with its result
    # closed however the loop ends, so an interrupt's message starts its own line
    with progress_bar(total=steps, unit="step", disable=not shown, desc=desc) as bar:
        for r in range(len(rounds) + 1):
            with ranks.agreed("sampling"):
                for (lo, hi), result in made:
                    take(lo, hi, result)
                mine = rounds[r][rank] if r < len(rounds) and rank < len(rounds[r]) else None
                result = None if mine is None else run(*mine, lambda *_: bar.update(1))
            parts = distributed.gather_objects(result)  # rank 0's, in rank order
            made = [] if parts is None or r == len(rounds) else list(zip(rounds[r], parts))
