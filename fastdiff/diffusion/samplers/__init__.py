"""Sampling: one shared loop over step functions (DDPM, DDIM, DPM-Solver++(2M)).

A sampler is only an update rule (``ddpm.py``, ``ddim.py``, ``dpm_solver.py``); ``SamplingStep``
wraps it with the model call, x0 clipping and guidance into the one callable a step is (the unit
a CUDA graph will capture), and ``sample_steps`` is the loop every entry point uses, including
the guided-diffusion compat ``p_sample_loop`` / ``ddim_sample_loop``.

Inside the loop there are no host->device copies (timesteps and tables live on the device) and
no host syncs: non-finite values are tracked on the device and reported once at the end.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...config import unknown_choice
from ..errors import SamplingError
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance
from .ddim import DDIMStep
from .ddpm import DDPMStep
from .dpm_solver import DPMSolverPP2MStep
from .rule import UpdateRule

# noise_fn(i, x): step i's noise, shaped like x. It may read x's shape, dtype and device, not its
# values: an engine that runs the whole loop at once draws every step's noise before the first.
NoiseFn = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler name's rule and how its steps are chosen by default."""

    rule: Callable[..., UpdateRule]  # (diffusion, *, eta, device, dtype) -> rule
    default_steps: int
    ddim_spacing: bool  # "--steps N" means guided-diffusion's "ddimN" (else N evenly spaced)
    uses_eta: bool

    def respacing(self, steps: int | None = None) -> str:
        """guided-diffusion's respacing string for ``steps`` (the default when None)."""
        steps = self.default_steps if steps is None else steps
        return f"ddim{steps}" if self.ddim_spacing else str(steps)


# The one registry of sampler names: the CLI's choices, default step counts, the trainer's preview
# grids and the evaluation scripts all read it.
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(DDIMStep, default_steps=25, ddim_spacing=True, uses_eta=True),
    "ddpm": SamplerSpec(DDPMStep, default_steps=250, ddim_spacing=False, uses_eta=False),
    "dpm++2m": SamplerSpec(DPMSolverPP2MStep, default_steps=20, ddim_spacing=False, uses_eta=False),
}


def get_sampler(name: str) -> SamplerSpec:
    if not (isinstance(name, str) and name in SAMPLERS):  # a list was an unhashable-type TypeError
        raise ValueError(unknown_choice("sampler", name, SAMPLERS))
    return SAMPLERS[name]


def check_eta_range(eta: float) -> None:
    """ValueError unless ``eta`` lies in [0, 1], the range any eta is held to (1 is DDPM's
    variance; above it sigma outgrows the step's noise budget and the first step is NaN)."""
    real = isinstance(eta, numbers.Real) and not isinstance(eta, bool)
    if not (real and math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a finite number >= 0 and <= 1 (1: DDPM's variance), got {eta!r}")


def check_eta(sampler: str, eta: float) -> None:
    """ValueError unless ``eta`` suits ``sampler``: in check_eta_range's range, and 0 for a rule
    that takes none (only DDIM's does)."""
    check_eta_range(eta)
    if eta and not get_sampler(sampler).uses_eta:
        raise ValueError(f"eta is a DDIM parameter; sampler {sampler} does not use it")


def is_int(value) -> bool:
    """An integer that is no bool (True is no class id or count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_labels(labels, limits: Sequence[tuple[int, str]], n: int | None = None, device=None) -> Tensor:
    """``labels`` as a 1-D long tensor on ``device``, or one ValueError: integer class ids, one per
    image (``n`` when the batch size is known), each within every ``(count, network)`` limit. Its
    one host sync is why callers run it once before the loop, never inside a step."""
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be integer class ids, got {type(labels).__name__}") from None
    if labels.numel() == 0:
        raise ValueError("nothing to sample: the batch is empty")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.dim() > 1:  # a [1, N] or [N, 1] tensor was flattened, a [B, N] one sampled B*N images
        raise ValueError(f"labels must be one class id per image (1-D), got shape {list(labels.shape)}")
    labels = labels.to(device, torch.long).reshape(-1)
    if n is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images: pass one label per image")
    low, high = int(labels.min()), int(labels.max())
    for count, network in limits:
        if low < 0 or high >= count:
            bad = low if low < 0 else high
            raise ValueError(f"label {bad} out of range: {network} has classes 0..{count - 1}")
    return labels


def check_shape(shape, batch: bool = True) -> tuple[int, ...]:
    """``shape`` as a tuple, or one ValueError: positive ints, a batch (unless ``batch`` is False:
    an image_shape), channels and at least one spatial size (a 0 or a float was an error from deep
    inside torch.randn or the first conv)."""
    least = 3 if batch else 2
    if not (isinstance(shape, Sequence) and len(shape) >= least and all(is_int(d) and d >= 1 for d in shape)):
        name, dims = ("shape", "N, C, H, W") if batch else ("image_shape", "C, H, W")
        raise ValueError(f"{name} must be positive ints ({dims}), got {shape!r}")
    return tuple(shape)


def check_finite_noise(noise: Tensor | None) -> None:
    """ValueError when x_T holds NaN or infinity: every step would be non-finite, reported only
    after the whole loop. One host sync, before the loop."""
    if noise is not None and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite (x_T, standard normal); it holds NaN or infinity")


def make_rule(diffusion, sampler: str, eta: float = 0.0, device="cpu", dtype=torch.float32) -> UpdateRule:
    """The update rule of a sampler name, with its tables on ``device``."""
    return get_sampler(sampler).rule(diffusion, eta=eta, device=device, dtype=dtype)


def narrow_batch(value, start: int, length: int, n: int):
    """``value``'s samples ``start .. start+length`` when it is a batch of n (a tensor, or a tuple
    or list of them, as views); anything else unchanged."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != n:
            raise ValueError(f"cannot split a batch of {n}: a tensor has shape {list(value.shape)}")
        return value.narrow(0, start, length)
    if isinstance(value, tuple | list):
        return type(value)(narrow_batch(v, start, length, n) for v in value)
    return value


class SamplingStep:
    """One sampling step: model -> p_mean_variance (clip/denoised_fn) -> guidance -> update.

    ``cond_fn(x, t_model, **cond_kwargs)`` is any guidance gradient (``ClassifierGuidance`` or a
    guided-diffusion style function); DDPM applies it to the mean, DDIM and DPM-Solver++ to the
    score, as the rule declares.
    """

    def __init__(
        self,
        diffusion,
        model,
        rule,
        *,
        model_kwargs: dict | None = None,
        cond_fn=None,
        cond_kwargs: dict | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ):
        self.diffusion = diffusion
        self.model = model
        self.rule = rule
        self.model_kwargs = model_kwargs or {}
        self.cond_fn = cond_fn
        self.cond_kwargs = self.model_kwargs if cond_kwargs is None else cond_kwargs
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn

    def prepare(self, x: Tensor) -> None:
        """Put the process tables a step reads on x's device before the loop, so no step (or
        CUDA graph capture of one) copies host->device; the rule has its own already."""
        self.diffusion.tables(x.device, x.dtype)
        self.diffusion.model_timesteps(torch.zeros(1, dtype=torch.long, device=x.device))

    def narrow(self, start: int, length: int, n: int) -> SamplingStep:
        """This step for samples ``start .. start+length`` of a batch of n: the per-sample keyword
        tensors (labels) become views, so a caller refilling the full buffers feeds every slice."""

        def cut(kwargs: dict) -> dict:
            return {key: narrow_batch(value, start, length, n) for key, value in kwargs.items()}

        sub = copy.copy(self)
        sub.model_kwargs = cut(self.model_kwargs)
        sub.cond_kwargs = sub.model_kwargs if self.cond_kwargs is self.model_kwargs else cut(self.cond_kwargs)
        return sub

    # Set by the CUDA-graph engine: the guidance gradient then runs on this stream beside the
    # model (it reads x_t, not the model's output) and the step joins both before guiding.
    guidance_stream = None

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        """-> (x_next, pred_xstart, state)."""
        d = self.diffusion
        cond_fn, stream = self.cond_fn, self.guidance_stream
        if cond_fn is not None and stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                gradient = cond_fn(x, d.model_timesteps(t), **self.cond_kwargs)

            def cond_fn(*_args, **_kwargs):
                return gradient

        # guided-diffusion's loops clip x0 before guiding; a "score_then_clip" rule clips the
        # guided x0 instead, as the DPM-Solver authors do (the same step when unguided).
        clip_after = cond_fn is not None and self.rule.guidance == "score_then_clip"
        clip_first = self.clip_denoised and not clip_after
        out = d.p_mean_variance(self.model, x, t, clip_first, self.denoised_fn, self.model_kwargs)
        if cond_fn is not None:
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
            if self.rule.guidance == "mean":
                out = {**out, "mean": d.condition_mean(cond_fn, out, x, t, self.cond_kwargs)}
            else:
                clip = self.clip_denoised and clip_after
                out = d.condition_score(cond_fn, out, x, t, self.cond_kwargs, clip_denoised=clip)
        x_next, state = self.rule(out, x, t, noise, state)
        return x_next, out["pred_xstart"], state


def model_device(model) -> torch.device:
    """Where ``model`` computes: its first parameter's device; the CPU for a model without
    parameters (a plain function, as the samplers also take)."""
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    """Normal noise; with a generator it is drawn on the generator's device (so a seed gives the
    same numbers wherever the model runs) and then moved. Without one, the global RNG is used,
    drawing exactly what guided-diffusion's loops draw."""
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    return torch.randn(*shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_steps(
    diffusion,
    model,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    cond_fn=None,
    cond_kwargs: dict | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    device=None,
    progress: bool = False,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(i, x, pred_xstart)`` after each of the diffusion's ``num_timesteps`` steps.

    ``noise`` is x_T (else drawn from ``generator``); ``noise_fn(i, x)`` overrides the per-step
    noise of stochastic samplers (e.g. to replay recorded noise). After the last step, raises
    ``SamplingError`` naming the first step that produced NaN/Inf.
    """
    get_sampler(sampler)  # an unknown name first, then the arguments, all before any step runs
    check_eta(sampler, eta)  # DDIM's eta above 1 was a NaN report after the whole loop
    shape = check_shape(shape)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if noise is not None and tuple(noise.shape) != tuple(shape):
        # x_T sets the batch: another one met the labels' as a misleading output-channels error
        raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
    check_finite_noise(noise)
    if device is None:
        device = noise.device if noise is not None else model_device(model)
    x = randn(tuple(shape), generator, device) if noise is None else noise.to(device)
    if noise_fn is None:

        def noise_fn(i: int, x: Tensor) -> Tensor:
            return randn(x.shape, generator, x.device, x.dtype)

    rule = make_rule(diffusion, sampler, eta, x.device, x.dtype)
    step = SamplingStep(
        diffusion,
        model,
        rule,
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        cond_kwargs=cond_kwargs,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    step.prepare(x)
    yield from run_steps(diffusion, step, rule, x, noise_fn, progress=progress, desc=sampler)


StepFn = Callable[[Tensor, Tensor, "Tensor | None", object], tuple[Tensor, Tensor, object]]


def loop_timesteps(n: int, x: Tensor) -> Tensor:
    """The respaced step indices n-1 .. 0 the loop feeds its steps, one row of x's batch size per
    step, built on x's device."""
    return torch.arange(n - 1, -1, -1, device=x.device).view(n, 1).repeat(1, x.shape[0])


def track_first_bad(first_bad: Tensor, i: int, x: Tensor, n: int) -> Tensor:
    """``first_bad`` (n, the step count, while every step was finite) becomes i at the first step
    whose x is not all finite: tracked on the device, so the loop needs no host sync until it ends."""
    return torch.where((first_bad == n) & ~torch.isfinite(x).all(), i, first_bad)


def run_steps(
    diffusion,
    step: StepFn,
    rule: UpdateRule,
    x: Tensor,
    noise_fn: NoiseFn,
    *,
    progress: bool = False,
    desc: str = "sampling",
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """The one sampling loop: ``step(x, t, noise, state)`` (a SamplingStep, or an engine's compiled
    or captured form of one) over respaced steps n-1 .. 0 from x_T = ``x``.

    Yields ``(i, x, pred_xstart)`` after each step; an engine may reuse those buffers at the next
    step, so a caller that keeps them clones. Raises ``SamplingError`` after the last step, naming
    the first step that produced NaN/Inf (tracked on the device: no host sync inside the loop).
    """
    n = diffusion.num_timesteps
    timesteps = loop_timesteps(n, x)
    state = rule.init_state(x)
    if progress:
        from fastdiff.progress import progress_bar
    run_loop = getattr(step, "run_loop", None)
    if run_loop is not None:
        # An engine that runs all n steps at once (the whole loop as one CUDA graph): the noise is
        # drawn first, in the loop's order (so a seed gives the same samples), and only the last
        # step is seen.
        with torch.no_grad():
            noises = torch.stack([noise_fn(i, x) for i in range(n)]) if rule.needs_noise else None
            x, pred_xstart, first_bad = run_loop(x, timesteps, noises, state)
        if progress:
            progress_bar(range(n), desc=desc, initial=n, total=n).close()
        yield n - 1, x, pred_xstart
    else:
        first_bad = torch.full((), n, dtype=torch.long, device=x.device)
        for i in progress_bar(range(n), desc=desc) if progress else range(n):
            with torch.no_grad():
                step_noise = noise_fn(i, x) if rule.needs_noise else None
                x, pred_xstart, state = step(x, timesteps[i], step_noise, state)
                first_bad = track_first_bad(first_bad, i, x, n)
            yield i, x, pred_xstart
    bad = int(first_bad)  # the one host sync of the loop
    if bad < n:
        index = n - 1 - bad
        why = ""
        if diffusion.alphas_cumprod[index] == 0:
            # The model is not to blame: x_0 and eps are recovered by dividing by sqrt(alpha_bar).
            why = (
                "; the process's alpha_bar is 0 there (a last beta of 1, as the linear schedule's"
                " at 20 steps), so no model can be sampled from it: respace to skip that step"
                " (e.g. a ddim respacing) or use a process with more steps"
            )
        raise SamplingError(
            f"non-finite values at sampling step {bad + 1}/{n} (t={int(diffusion.timestep_map[index])}){why}"
        )


def sample(
    diffusion,
    model,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    classifier=None,
    classifier_scale: float = 0.0,
    cfg_scale: float | None = None,
    null_label: int | None = None,
    clip_denoised: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = False,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Draw samples of ``shape`` with ``sampler`` over the (respaced) steps of ``diffusion``
    (a GaussianDiffusion), ``model(x, t, **model_kwargs)`` predicting each step.

    x_T is ``noise`` (a floating-point tensor of ``shape``), else drawn from ``generator`` (the
    global RNG without one) on ``device`` (None: the noise's, else the model's). ``eta`` is DDIM's
    noise in [0, 1]; ``clip_denoised`` clips each step's x_0 prediction to [-1, 1]; ``progress``
    shows a progress bar.

    ``model_kwargs["y"]`` holds class labels: the model gets them only when it is
    class-conditional (``model.num_classes`` not None), as classifier_sample.py does, while
    classifier guidance (``classifier`` with ``classifier_scale != 0``) and classifier-free
    guidance (``cfg_scale``, unconditional half labelled ``null_label``) use them.
    ``callback(i, x, pred_xstart)`` runs after every step. The labels and ``null_label`` are
    checked once before the loop (integers, one label per image, within the model's ``label_emb``
    table and the classifier's ``num_classes``), not by the model inside it, where a check would
    cost a host sync per step; a model's ``num_classes`` is no bound, since another model's null
    label may lie beyond its classes.
    """
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")
    shape = check_shape(shape)  # its batch size bounds the labels
    if classifier is None and classifier_scale:  # the samples would be silently unguided
        raise ValueError("classifier_scale needs a classifier")
    if noise is not None and not (isinstance(noise, Tensor) and noise.is_floating_point()):
        kind = noise.dtype if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a floating-point tensor, got {kind}")
    if device is None:
        device = noise.device if noise is not None else model_device(model)
    guidance_kwargs = dict(model_kwargs or {})
    cond_fn = None
    if classifier is not None and classifier_scale != 0:
        cond_fn = ClassifierGuidance(classifier, classifier_scale)
    table = getattr(model, "label_emb", None)
    count = table.num_embeddings if isinstance(table, torch.nn.Embedding) else None
    if guidance_kwargs.get("y") is not None:
        limits = [] if count is None else [(count, "the model")]
        if cond_fn is not None and is_int(getattr(classifier, "num_classes", None)):
            limits.append((classifier.num_classes, "the classifier"))
        guidance_kwargs["y"] = check_labels(guidance_kwargs["y"], limits, shape[0], device)
    model_kwargs = dict(guidance_kwargs)
    if getattr(model, "num_classes", 0) is None:
        model_kwargs.pop("y", None)
    if cfg_scale is not None:
        if null_label is None:
            raise ValueError("classifier-free guidance needs null_label (the unconditional class label)")
        if not (is_int(null_label) and null_label >= 0 and (count is None or null_label < count)):
            allowed = "a class id >= 0" if count is None else f"one of the model's {count} class ids"
            raise ValueError(f"null_label must be {allowed}, got {null_label!r}")
        if "y" not in model_kwargs:
            raise ValueError(
                "classifier-free guidance needs a class-conditional model and labels in model_kwargs['y']"
            )
        model = ClassifierFreeGuidance(model, cfg_scale, null_label)
    x = None
    for i, x, pred_xstart in sample_steps(
        diffusion,
        model,
        shape,
        sampler=sampler,
        eta=eta,
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        cond_kwargs=guidance_kwargs,
        clip_denoised=clip_denoised,
        noise=noise,
        generator=generator,
        device=device,
        progress=progress,
    ):
        if callback is not None:
            callback(i, x, pred_xstart)
    return x


__all__ = [
    "SAMPLERS",
    "DDIMStep",
    "DDPMStep",
    "DPMSolverPP2MStep",
    "SamplerSpec",
    "SamplingStep",
    "StepFn",
    "UpdateRule",
    "check_eta",
    "check_eta_range",
    "check_finite_noise",
    "check_labels",
    "check_shape",
    "get_sampler",
    "is_int",
    "loop_timesteps",
    "make_rule",
    "model_device",
    "narrow_batch",
    "randn",
    "run_steps",
    "sample",
    "sample_steps",
    "track_first_bad",
]
