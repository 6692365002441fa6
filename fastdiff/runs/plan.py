"""What a sampling run makes, as one typed record: the Plan, and the checks that turn a user's
step count and class choice into its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fastdiff.diffusion import SAMPLERS
from fastdiff.diffusion.samplers.dpm_solver import first_order_final
from fastdiff.diffusion.schedule import kept_steps
from fastdiff.runs.errors import RunError

# The most images one run makes: its run.json lists every label and its batches are planned up
# front (10**7 take 2 s and 30 MB); 10**20 was numpy's "Maximum allowed size exceeded".
MAX_SAMPLES = 10**7


def check_counts(num_samples: int | None, batch_size: int) -> None:
    """--num-samples (None: the input's count) and --batch-size, before anything loads."""
    if (num_samples is not None and num_samples < 1) or batch_size < 1:
        raise RunError(
            f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}", usage=True
        )
    if num_samples is not None and num_samples > MAX_SAMPLES:
        raise RunError(
            f"--num-samples must be at most {MAX_SAMPLES} in one run, got {num_samples}", usage=True
        )


@dataclass(frozen=True)
class Plan:
    """What a run produces; stored as run.json so a resume can refuse a different run. The
    networks are their identities (LoadedModel.identity: path, or bundled:NAME, sha256, flags)."""

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
    device: str  # the device type: CPU and CUDA generators draw other noise from one seed
    clip_denoised: bool
    labels: list[int] | None

    def batches(self, num_samples: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, num_samples)) for s in range(0, num_samples, self.batch_size)]

    def record(self, num_samples: int) -> dict:
        """The run.json record of this plan for ``num_samples`` images. ``clip_guided_x0``: whether
        a classifier-guided step clips its guided x0 (dpm++2m since it follows the DPM-Solver
        authors; DDIM, and dpm++2m before, clip before guiding); ``first_order_final``: whether
        dpm++2m takes its step into t = 0 at first order (under 10 solver steps, since it follows
        the authors there too). A run made before either change is refused on resume rather than
        continued with the other solver."""
        guided = self.classifier is not None and self.classifier_scale != 0 and self.clip_denoised
        after = guided and SAMPLERS[self.sampler].rule.guidance == "score_then_clip"
        times = len(kept_steps(self.model["flags"]["diffusion_steps"], self.respacing))
        final = self.sampler == "dpm++2m" and first_order_final(times)
        return {
            **dataclasses.asdict(self),
            "num_samples": num_samples,
            "clip_guided_x0": after,
            "first_order_final": final,
        }


@dataclass(frozen=True)
class UpsamplePlan(Plan):
    """A sampling plan that also names each sample's low-res image by content (LowRes.digests)."""

    low_res: str


@dataclass(frozen=True)
class InversionPlan(Plan):
    """A DDIM inversion run (fastdiff invert: ddim, eta 0, no classifier, no noise to seed): its
    images by absolute path (a resume naming the same files through links keeps these) and the
    class their latents are regenerated under. Its record names the command, so neither command
    resumes the other's folder."""

    images: list[str]
    to_class: int | None

    def record(self, num_samples: int) -> dict:
        return {**super().record(num_samples), "command": "invert"}


def respacing_for(sampler: str, steps: int | None, respacing: str | None, total: int) -> str:
    """``--steps N`` as guided-diffusion users write it: "ddimN" strides for DDIM-style samplers."""
    if respacing is not None and steps is not None:
        raise RunError("give --steps or --respacing, not both")
    if respacing is None:
        spec = SAMPLERS[sampler]
        if steps is None:  # a model with fewer steps than the default samples every one
            steps = min(spec.default_steps, total)
        if not 2 <= steps <= total:
            # below 2 no model takes; above, this model's steps are the bound
            raise RunError(f"--steps must be between 2 and {total}, got {steps}", usage=steps < 2)
        respacing = spec.respacing(steps)
    try:
        kept_steps(total, respacing)
    except ValueError as e:  # the respacing parser's own checks
        raise RunError(f"respacing '{respacing}': {e}") from None
    return respacing


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def class_list(names: list[str], shown: int = 12) -> str:
    """A model's class names for a one-line message: the first ``shown`` and the count, so a
    1,000-class folder's error is not 1,000 names long."""
    more = f", ... ({len(names)} classes)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def class_ids(
    spec: str, alternatives: str = "", names: list[str] | None = None, option: str = "--classes"
) -> list[int]:
    """The ids of a --classes list like 1,207,360, or of the class ``names`` a model trained on
    (its data's folders); an empty item ("1,,2") is a typo, not nothing. ``alternatives`` names
    the words a command takes besides a list. A name is its class; a number that names no class
    is an id, unless a class is named by another number (folders 10 and 2 are ids 0 and 1): then
    a number read as an id would silently pick a class the user did not name, so it is refused."""
    items = [s.strip() for s in spec.split(",")]
    if not any(items):
        raise RunError(f"{option} '{spec}' names no class id")
    names = names or []
    index = {name: i for i, name in enumerate(names)}
    misleading = next(((i, n) for i, n in enumerate(names) if _as_int(n) not in (None, i)), None)
    ids = []
    for s in items:
        if s in index:
            ids.append(index[s])
        elif _as_int(s) is None:  # named among the known ones ("cat,bird": 'bird'), an empty item aside
            named = f", the model's class names ({class_list(names)})" if names else ""
            unknown = [f"'{s}'" for s in items if s not in index and _as_int(s) is None]
            got = f"{', '.join(unknown)} (in '{spec}')" if len(items) > 1 and "" not in items else f"'{spec}'"
            raise RunError(f"{option} must be class ids like 1,207,360{named}{alternatives}, got {got}")
        elif misleading is not None:
            raise RunError(
                f"{option}: '{s}' is no class name, and the classes are named by numbers that are not "
                f"their ids (class {misleading[0]} is '{misleading[1]}'): give names ({class_list(names)})"
            )
        else:
            ids.append(int(s))
    return ids


def parse_classes(
    spec: str | None, num_classes: int | None, n: int, seed: int, names: list[str] | None = None
) -> np.ndarray | None:
    """Labels for ``n`` samples: a list cycled, ``uniform`` (equal counts, the default) or ``random``."""
    if num_classes is None:
        if spec is not None:
            raise RunError("--classes given, but neither the model nor a classifier is class-aware")
        return None
    spec = "uniform" if spec is None else spec
    if spec == "uniform":
        return np.arange(n, dtype=np.int64) % num_classes
    if spec == "random":
        return np.random.default_rng(seed).integers(0, num_classes, size=n, dtype=np.int64)
    ids = class_ids(spec, " or 'uniform' or 'random'", names)
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise RunError(f"class id {bad[0]} out of range: the model has {num_classes} classes")
    return np.resize(np.asarray(ids, dtype=np.int64), n)
