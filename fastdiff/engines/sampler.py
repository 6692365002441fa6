"""``fastdiff.Sampler``: a model, a process, a sampler rule, guidance and an engine, prepared once.

What the CLI, the trainer's preview grids and evaluation scripts sample with. Building it puts
the networks in their inference form once (eval mode, no parameter gradients, the compute dtype,
channels_last where it measured faster); each call runs the one sampling loop through the
chosen engine, whose compiled or captured step is cached per batch shape (the compile engine
runs a smaller batch padded through a larger one's step rather than compiling again).
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastdiff.config import error_line
from fastdiff.diffusion.gaussian import GaussianDiffusion
from fastdiff.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
from fastdiff.diffusion.inversion import DDIMReverseStep, run_inversion
from fastdiff.diffusion.samplers import (
    SamplingStep,
    check_eta,
    check_finite_noise,
    check_labels,
    check_shape,
    get_sampler,
    is_int,
    loop_timesteps,
    make_rule,
    model_device,
    randn,
    run_steps,
)
from fastdiff.models.nn import InDtype
from fastdiff.models.unet import SuperResModel
from fastdiff.ops import autotuning

from . import CACHED_BUILDS, PADDED, EngineError, PaddedStep, build_engine, check_engine, default_engine

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def inference_form(
    net: nn.Module, dtype: torch.dtype, device: torch.device, channels_last: bool
) -> nn.Module:
    """``net`` in place: on ``device``, eval (dropout off), no parameter gradients, weights in
    ``dtype`` (GroupNorm statistics stay fp32 inside fastdiff.ops), optionally channels_last."""
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net if dtype == torch.float32 else InDtype(net, dtype)


def _key(n: int, model_kwargs: dict[str, Tensor] | None, invert: bool = False) -> tuple:
    """The key of a cached step: sampling or inversion, the batch size and the conditioning
    tensors' names, per-sample shapes, dtypes (their batch is n)."""
    layout = sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in (model_kwargs or {}).items())
    return ("invert" if invert else "sample", n, *layout)


def _number(name: str, value, minimum: float | None = 0.0) -> float:
    """``value`` as a float, or one ValueError: a finite real number (>= ``minimum`` if given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" and >= {minimum:g}"
        raise ValueError(f"{name} must be finite{bound}, got {value}")
    return float(value)


def _kind(value) -> str:
    """A tensor's dtype, else the value's type: what an error says a wrong input was."""
    return str(value.dtype) if isinstance(value, Tensor) else type(value).__name__


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or their torch dtypes, got {dtype!r}")


def _device(device, model: nn.Module) -> torch.device:
    """The device asked for, checked now: an unknown or absent one is one ValueError, not an error
    from deep inside the first step."""
    if device is None:
        return model_device(model)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = error_line(e).split(". ")[0]
        raise ValueError(f"device '{device}' is not available here: {reason}") from None
    return device


def _conditioning(model) -> tuple[set[str], set[str] | None]:
    """(keyword inputs ``model`` requires besides x, t and y; every one it accepts, None for any),
    read from its forward's signature, so a missing or misspelt ``low_res`` is refused up front."""
    try:
        params = list(inspect.signature(getattr(model, "forward", model)).parameters.values())[2:]
    except (TypeError, ValueError):  # no signature to read: anything goes
        return set(), None
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "y"]
    required = {p.name for p in named if p.default is p.empty}
    accepted = None if any(p.kind == p.VAR_KEYWORD for p in params) else {p.name for p in named}
    return required, accepted


class Sampler:
    """Draw guided samples: ``Sampler(model, diffusion, ...)(labels, generator=g) -> images``.

    ``model(x, t, y=...)`` is an ADM UNet (or anything with that call); ``diffusion`` a (respaced)
    process; ``sampler`` a name of ``fastdiff.diffusion.SAMPLERS`` (``eta`` in [0, 1]: DDIM's
    noise, 1 is DDPM's variance). Guidance: ``classifier`` with ``classifier_scale`` (gradient of
    log p(y | x_t)), or ``cfg_scale`` with the model's ``null_label``. ``engine``: a name of
    ``fastdiff.engines.ENGINES``; None picks the device's default. ``dtype``: the compute dtype,
    "fp32", "fp16", "bf16" or their torch dtypes; ``device``: None is the model's. The networks
    are converted in place (see :func:`inference_form`); ``channels_last`` None picks the faster
    layout for the device and dtype. ``clip_denoised`` clips each step's x_0 prediction to
    [-1, 1]. ``image_shape`` (C, H, W) is read from the model's ``in_channels`` and
    ``image_size`` unless given (a model without them needs it).
    An upsampler (ADM-U) takes its low-resolution images per call, ``model_kwargs={"low_res": ...}``.
    Images come back in [-1, 1], fp32, NCHW.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion,
        *,
        sampler: str = "ddim",
        eta: float = 0.0,
        classifier: nn.Module | None = None,
        classifier_scale: float = 0.0,
        cfg_scale: float | None = None,
        null_label: int | None = None,
        engine: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str | None = None,
        clip_denoised: bool = True,
        channels_last: bool | None = None,
        image_shape: Sequence[int] | None = None,
    ):
        get_sampler(sampler)  # an unknown name before anything else
        for name, net in (("model", model), ("classifier", classifier)):
            if not (isinstance(net, nn.Module) or (name == "classifier" and net is None)):
                raise ValueError(f"{name} must be an nn.Module, got {type(net).__name__}")
        if not isinstance(diffusion, GaussianDiffusion):
            raise ValueError(
                "diffusion must be a GaussianDiffusion (GaussianDiffusion.from_config(config, respacing)), "
                f"got {type(diffusion).__name__}"
            )
        if not isinstance(clip_denoised, bool):  # "no" would clip
            raise ValueError(f"clip_denoised must be True or False, got {clip_denoised!r}")
        eta = _number("eta", eta, minimum=None)
        check_eta(sampler, eta)
        classifier_scale = _number("classifier_scale", classifier_scale)
        if classifier_scale and classifier is None:
            raise ValueError("classifier_scale needs a classifier")
        self.class_cond = getattr(model, "num_classes", None) is not None
        if cfg_scale is not None:
            cfg_scale = _number("cfg_scale", cfg_scale, minimum=None)
            if null_label is None:
                raise ValueError("classifier-free guidance needs null_label (the unconditional class label)")
            if not self.class_cond:
                raise ValueError("classifier-free guidance needs a class-conditional model (num_classes)")
            if not (is_int(null_label) and 0 <= null_label < model.num_classes):
                raise ValueError(
                    f"null_label must be one of the model's {model.num_classes} class ids, got {null_label!r}"
                )
        self.device = _device(device, model)
        self.dtype = _dtype(dtype)
        self.engine = engine or default_engine(self.device)
        check_engine(self.engine, self.device, self.dtype)
        if channels_last is None:
            # Measured on the CPU (bench/results): NCHW is as fast for the UNet and faster for the
            # classifier's backward; tensor-core convolutions on CUDA want NHWC in fp16/bf16.
            channels_last = self.device.type == "cuda" and self.dtype != torch.float32
        if image_shape is None:
            if not (hasattr(model, "in_channels") and hasattr(model, "image_size")):
                raise ValueError(
                    f"pass image_shape (C, H, W): the model ({type(model).__name__}) has no "
                    "in_channels and image_size to read it from"
                )
            # An upsampler's first conv also takes the upsampled low-res image: half are x's channels.
            channels = int(model.in_channels) // (2 if isinstance(model, SuperResModel) else 1)
            image_shape = (channels, int(model.image_size), int(model.image_size))
        self.image_shape = check_shape(image_shape, batch=False)
        size = getattr(model, "image_size", None)
        if self.engine in CACHED_BUILDS and size is not None and self.image_shape[1:] != (size, size):
            # The graph is exported at the model's size: every step would fail, after the export.
            raise EngineError(
                f"engine '{self.engine}' runs a graph exported at the model's {size}x{size} images; "
                f"image_shape {self.image_shape} needs another engine (eager, compile, graph)"
            )
        self.diffusion, self.sampler, self.eta, self.clip_denoised = diffusion, sampler, eta, clip_denoised
        self.upsampler = isinstance(model, SuperResModel)
        self.required, self.accepted = _conditioning(model)
        # The labels a call may pass: each class-aware network's class count bounds them.
        self.label_limits = [(model.num_classes, "the model")] if self.class_cond else []
        self.model = inference_form(model, self.dtype, self.device, channels_last)
        self.cond_fn = None
        if classifier is not None and classifier_scale:
            sees = (getattr(classifier, "in_channels", None), getattr(classifier, "image_size", None))
            if None not in sees and sees != (self.image_shape[0], self.image_shape[-1]):
                raise ValueError(
                    f"the classifier takes {sees[0]}x{sees[1]}x{sees[1]} images, the model makes "
                    f"{'x'.join(map(str, self.image_shape))}"
                )
            self.classifier = inference_form(classifier, self.dtype, self.device, channels_last)
            self.cond_fn = ClassifierGuidance(self.classifier, classifier_scale)
            if getattr(classifier, "num_classes", None) is not None:
                self.label_limits.append((classifier.num_classes, "the classifier"))
        self.denoiser = (
            self.model if cfg_scale is None else ClassifierFreeGuidance(self.model, cfg_scale, null_label)
        )
        self.needs_labels = self.class_cond or self.cond_fn is not None or cfg_scale is not None
        self.rule = make_rule(diffusion, sampler, eta, self.device, torch.float32)
        self._steps: dict[tuple, tuple[Tensor | None, Callable]] = {}
        self._extra: dict[tuple, dict[str, Tensor]] = {}
        self.warmup_seconds = 0.0  # engine preparation (build, compile, capture, autotuning) so far
        # A call fills the cached step's label and conditioning buffers and runs its whole loop on
        # them: calls from two threads would overwrite each other's (silently wrong samples), so
        # they take turns (reentrant: a callback may sample)
        self._lock = threading.RLock()

    def step_for(
        self, n: int, model_kwargs: dict[str, Tensor] | None = None, *, invert: bool = False
    ) -> tuple[Tensor | None, Callable]:
        """(label buffer, the engine's step) for batch size n (and the shapes of ``model_kwargs``),
        built once: a call copies its labels and conditioning tensors into the step's buffers, so a
        compiled or captured step is reused across batches. ``invert``: the DDIM inversion step."""
        key = _key(n, model_kwargs, invert)
        if key not in self._steps:
            rule = (
                DDIMReverseStep(self.diffusion, device=self.device, dtype=torch.float32)
                if invert
                else self.rule
            )
            labels, self._extra[key], run = self._new_step(n, rule, model_kwargs)
            self._steps[key] = (labels, run)
        return self._steps[key]

    def _new_step(self, n: int, rule, model_kwargs: dict[str, Tensor] | None):
        """(label buffer, conditioning buffers, engine step) of ``rule`` for batch size n. Building
        the engine (an ONNX export and its session, a compile's setup) is warm-up, not sampling."""
        check_engine(self.engine, self.device, self.dtype, n)  # before an export or build
        start = time.perf_counter()
        labels = torch.zeros(n, dtype=torch.long, device=self.device) if self.needs_labels else None
        guidance_kwargs = {} if labels is None else {"y": labels}
        extra = {k: torch.zeros_like(v, device=self.device) for k, v in (model_kwargs or {}).items()}
        step = SamplingStep(
            self.diffusion,
            self.denoiser,
            rule,
            model_kwargs={**extra, **(guidance_kwargs if self.class_cond else {})},
            cond_fn=self.cond_fn,
            cond_kwargs=guidance_kwargs,
            clip_denoised=self.clip_denoised,
        )
        step.prepare(torch.zeros(1, device=self.device))
        run = build_engine(self.engine, step, self.device)
        self.warmup_seconds += time.perf_counter() - start
        return labels, extra, run

    def _size_for(self, n: int, model_kwargs: dict[str, Tensor] | None, invert: bool = False) -> int:
        """The batch size whose step runs a batch of n: n, or where the engine pads (PADDED) the
        smallest larger size already built for the same mode and conditioning layout, so a run's
        last partial batch reuses the full batches' compiled step instead of compiling again."""
        key = _key(n, model_kwargs, invert)
        if self.engine not in PADDED or key in self._steps:
            return n
        larger = [k[1] for k in self._steps if k[1] > n and k[0] == key[0] and k[2:] == key[2:]]
        return min(larger, default=n)

    def _fill(
        self, n: int, labels: Tensor | None, model_kwargs: dict[str, Tensor] | None, invert: bool = False
    ) -> Callable:
        """The step for this batch with its labels and conditioning copied into the buffers; a
        padded step's extra rows get the first label (any valid one) and zero conditioning."""
        self._check_networks()
        size = self._size_for(n, model_kwargs, invert)
        labels_buf, run = self.step_for(size, model_kwargs, invert=invert)
        if labels_buf is not None and labels is not None:
            labels_buf[:n].copy_(labels)
            labels_buf[n:].copy_(labels[:1].expand(size - n))
        for k, buf in self._extra[_key(size, model_kwargs, invert)].items():
            buf[:n].copy_(model_kwargs[k])
            buf[n:].zero_()
        return run if size == n else PaddedStep(run, size)

    def _check_networks(self) -> None:
        """The networks are still in the dtype and on the device this Sampler put them: they are
        converted in place, so a Sampler built later on the same network with another dtype (or a
        ``.to()``) converted them under this one, which then failed deep in its first conv."""
        for name, net in (("model", self.model), ("classifier", getattr(self, "classifier", None))):
            p = None if net is None else next(net.parameters(), None)
            if p is not None and (p.dtype != self.dtype or p.device.type != self.device.type):
                raise ValueError(
                    f"the {name}'s weights are {p.dtype} on {p.device}, this Sampler made them "
                    f"{self.dtype} on {self.device}: another Sampler on the same network (or .to()) "
                    "converted them since; build this Sampler again or give each its own copy"
                )

    def _labels(self, labels, n: int | None) -> Tensor | None:
        """``labels`` as a long tensor on the device, checked before any work: integer class ids
        each class-aware network has, one per image (``n`` when the batch size is already known)."""
        if labels is None:
            if self.needs_labels:
                raise ValueError("this model or its guidance is class-conditional: pass labels")
            return None
        if not self.needs_labels:
            raise ValueError(
                "labels given, but neither the model nor its guidance is class-conditional: "
                "pass num_samples or noise instead"
            )
        return check_labels(labels, self.label_limits, n, self.device)

    def _model_kwargs(self, model_kwargs: dict | None, n: int) -> dict[str, Tensor]:
        """The per-call conditioning on the device, checked against what the model's forward takes;
        floating-point tensors in fp32, as x is (a float64 one failed in the first conv)."""
        tensors = {}
        for k, v in (model_kwargs or {}).items():
            try:
                tensors[k] = torch.as_tensor(v, device=self.device)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"model_kwargs[{k!r}] must be a tensor, got {type(v).__name__}") from None
            if tensors[k].is_floating_point():
                tensors[k] = tensors[k].float()
        model_kwargs = tensors
        if "y" in model_kwargs:
            raise ValueError("pass class labels as labels, not in model_kwargs")
        missing = sorted(self.required - model_kwargs.keys())
        if missing:
            raise ValueError(
                f"the model needs {', '.join(missing)} in model_kwargs (one row per image"
                f"{'; an upsampler: the low-resolution images in [-1, 1]' if self.upsampler else ''})"
            )
        unknown = sorted(set(model_kwargs) - self.accepted) if self.accepted is not None else []
        if unknown:
            takes = ", ".join(sorted(self.accepted)) or "nothing"
            raise ValueError(f"the model takes no {unknown[0]!r} in model_kwargs (it takes: {takes})")
        for k, v in model_kwargs.items():
            if v.dim() == 0 or v.shape[0] != n:
                raise ValueError(
                    f"model_kwargs[{k!r}] must have one row per image ({n}), got {list(v.shape)}"
                )
        low_res = model_kwargs.get("low_res")
        # other channels were a conv error from the first step; another size is resized to the
        # output's by the model, as the original's SuperResModel does
        channels = self.image_shape[0]
        if self.upsampler and (
            low_res.dim() != 4 or not low_res.is_floating_point() or low_res.shape[1] != channels
        ):
            raise ValueError(
                f"low_res must be floating-point NCHW images of {channels} channels in [-1, 1], "
                f"got {list(low_res.shape)} {low_res.dtype}"
            )
        return model_kwargs

    def warmup(
        self,
        labels: Tensor | None = None,
        n: int | None = None,
        model_kwargs: dict[str, Tensor] | None = None,
    ) -> float:
        """Prepare the engine for a batch (build it, compile, capture, choose kernel backends by
        measuring them) with one throw-away step, timed apart from sampling; returns its seconds."""
        n = len(labels) if labels is not None else n
        with self._lock:
            before = self.warmup_seconds
            run = self._fill(n, labels, model_kwargs)  # a new step's build is counted by _new_step
            start = time.perf_counter()
            x = torch.zeros(n, *self.image_shape, device=self.device)
            t = torch.full((n,), self.diffusion.num_timesteps - 1, device=self.device, dtype=torch.long)
            noise = torch.zeros_like(x) if self.rule.needs_noise else None
            with torch.no_grad(), autotuning():
                run(x, t, noise, self.rule.init_state(x))
                if hasattr(run, "run_loop"):  # a whole-loop engine captures its loop here, timed apart
                    steps = loop_timesteps(self.diffusion.num_timesteps, x)
                    noises = None if noise is None else noise.expand(len(steps), *noise.shape)
                    run.capture(x, steps, noises, self.rule.init_state(x))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.warmup_seconds += time.perf_counter() - start
            return self.warmup_seconds - before

    def __call__(
        self,
        labels: Tensor | Sequence[int] | None = None,
        *,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        progress: bool = False,
        model_kwargs: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Samples for ``labels`` (one per image; required when the model or the guidance is
        class-aware, refused when neither is), else ``num_samples`` images. x_T is ``noise`` or
        drawn from ``generator`` (on the generator's device, so a seed gives the same images on any
        device and engine). ``callback(i, x, pred_xstart)`` runs after each step (its tensors are
        reused next step; under the ``graph-loop`` engine, after the last step only); ``progress``
        shows a progress bar of the steps.
        ``model_kwargs``: further per-sample conditioning the model takes (an upsampler's
        ``low_res``), one row per image; labels stay in ``labels``. Every argument is checked
        before the first step (one ValueError)."""
        if num_samples is not None and not (is_int(num_samples) and num_samples >= 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if noise is not None and not (isinstance(noise, Tensor) and noise.is_floating_point()):
            raise ValueError(f"noise must be a floating-point tensor, got {_kind(noise)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        labels = self._labels(labels, num_samples)
        if labels is not None:
            n = len(labels)
        else:
            n = num_samples if num_samples is not None else (len(noise) if noise is not None else None)
            if n is None:
                raise ValueError("pass num_samples or noise")
        if n < 1:
            raise ValueError("nothing to sample: the batch is empty")
        model_kwargs = self._model_kwargs(model_kwargs, n)
        shape = (n, *self.image_shape)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
        check_finite_noise(noise)
        with self._lock:
            fresh = _key(self._size_for(n, model_kwargs), model_kwargs) not in self._steps
            if fresh and (self.engine not in ("eager", "parallel") or self.device.type == "cuda"):
                self.warmup(labels, n, model_kwargs)  # compile / capture / backend choice, timed apart
            run = self._fill(n, labels, model_kwargs)
            x_T = (
                randn(shape, generator, self.device)
                if noise is None
                else noise.to(self.device, torch.float32)
            )

            def noise_fn(i: int, x: Tensor) -> Tensor:
                return randn(x.shape, generator, x.device, x.dtype)

            x = x_T
            steps = run_steps(
                self.diffusion, run, self.rule, x_T, noise_fn, progress=progress, desc=self.sampler
            )
            for i, x, pred_xstart in steps:
                if callback is not None:
                    callback(i, x, pred_xstart)
            return x.clone()

    def invert(
        self,
        images: Tensor,
        labels: Tensor | Sequence[int] | None = None,
        *,
        model_kwargs: dict[str, Tensor] | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """x_T of ``images`` ([-1, 1], NCHW) by DDIM inversion (fastdiff.diffusion.inversion) with
        this sampler's model, guidance and engine: sampling it back with ddim, eta 0 and the same
        ``labels`` (and ``model_kwargs``) reproduces the images (up to the inversion's approximation).
        ``callback`` as sampling's: after each step (under ``graph-loop``, after the last only)."""
        if not (isinstance(images, Tensor) and images.is_floating_point()):
            raise ValueError(f"images must be a floating-point tensor, got {_kind(images)}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or len(images) < 1:
            raise ValueError(
                f"images must have shape [N, {', '.join(map(str, self.image_shape))}], "
                f"got {list(images.shape)}"
            )
        images = images.to(self.device, torch.float32)
        if not bool(torch.isfinite(images).all()):  # the inversion would be NaN throughout, silently
            raise ValueError("images must be finite (NCHW in [-1, 1]); they hold NaN or infinity")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        n = len(images)
        labels = self._labels(labels, n)
        model_kwargs = self._model_kwargs(model_kwargs, n)
        with self._lock:
            run = self._fill(n, labels, model_kwargs, invert=True)
            return run_inversion(self.diffusion, run, images, callback)
