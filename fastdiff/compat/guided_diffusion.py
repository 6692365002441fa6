"""guided-diffusion's ``script_util`` names, returning fastdiff models and processes.

Code written against guided-diffusion (``create_model_and_diffusion(**args)``, then
``diffusion.ddim_sample_loop(model, shape, cond_fn=..., model_kwargs=...)``) runs unchanged;
``fastdiff gd-run`` serves this module as ``guided_diffusion.script_util``. The sampling loops
run fastdiff's one loop (``run_steps``) over the same ``SamplingStep`` the CLI uses, but draw
from the global RNG exactly what the original draws (x_T, then one ``randn_like`` per step even
where the step does not use it), so a seed gives the original's batches one after another.
``FASTDIFF_GD_ENGINE`` (eager by default; ``auto`` is the device's default) picks the engine.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from ..diffusion.config import DiffusionConfig
from ..diffusion.gaussian import GaussianDiffusion, mean_flat
from ..diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from ..diffusion.samplers import SamplingStep, _model_device, make_rule, run_steps
from ..diffusion.schedule import space_timesteps  # noqa: F401 (script_util re-exports it)
from ..models import flags as gd_flags
from ..models.presets import build_network
from .unet import EncoderUNetModel, SuperResModel, UNetModel  # noqa: F401 (as script_util)

# Read by create_model / sr_create_model at call time, as the original's builders read it:
# ``script_util.NUM_CLASSES = 10`` before building gives a 10-class model.
NUM_CLASSES = 1000

ENGINE_ENV = "FASTDIFF_GD_ENGINE"


def loop_engine(device) -> str:
    """The engine the compat loops run (``FASTDIFF_GD_ENGINE``): eager unless asked otherwise."""
    from ..engines import default_engine

    name = os.environ.get(ENGINE_ENV, "").strip() or "eager"
    return default_engine(torch.device(device)) if name == "auto" else name


def _draw_like(x: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(x)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion with guided-diffusion's per-step and loop methods.

    As in the original, ``cond_fn(x, t, **model_kwargs)`` returns the scaled gradient and is
    called with the original (or 0..1000-rescaled) timesteps, like the model. Unlike the
    original, a loop that produced NaN/Inf raises ``SamplingError`` after its last step. Every
    step draws its noise before the model runs (the original draws it after): the same numbers
    unless the model itself draws random numbers (dropout in train mode).
    """

    @property
    def use_timesteps(self) -> set[int]:
        """The original steps this process kept."""
        return {int(s) for s in self.timestep_map}

    @property
    def alphas_cumprod_next(self) -> np.ndarray:
        return np.append(self.alphas_cumprod[1:], 0.0)

    # The original's private names, which user code calls.
    _predict_xstart_from_eps = GaussianDiffusion.predict_xstart_from_eps
    _predict_eps_from_xstart = GaussianDiffusion.predict_eps_from_xstart

    def _scale_timesteps(self, t):
        # As the original's SpacedDiffusion: the model wrapper maps and scales, not this.
        return t

    # ---------------------------------------------------------------- one step

    def _rule(self, sampler: str, eta: float, x: torch.Tensor):
        key = ("compat-rule", sampler, float(eta), x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = make_rule(self, sampler, eta, x.device, x.dtype)
        return self._cache[key]

    def _step(self, sampler, model, x, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta=0.0):
        rule = self._rule(sampler, eta, x)
        step = SamplingStep(
            self,
            model,
            rule,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )
        return step, rule

    def _engine_step(self, engine, sampler, model, x, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta):
        """The engine's step, reused by the next loop of the same model, guidance and batch shape:
        the keyword tensors (labels, low_res) are copied into its buffers, so a script's batches
        compile or capture once, as ``fastdiff.Sampler`` does per batch size."""
        from ..engines import build_engine

        def layout(kwargs):
            # Other values are baked into the step: the same objects only (the buffers keep them alive).
            return {
                k: (v.shape, v.dtype, v.device) if torch.is_tensor(v) else id(v) for k, v in kwargs.items()
            }

        users = (model, cond_fn, denoised_fn)
        setting = (engine, sampler, float(eta), bool(clip_denoised), x.shape, x.dtype, x.device)
        cached = self._cache.get("compat-engine")
        if cached is not None:
            c_users, c_setting, c_layout, buffers, run, rule = cached
            same_users = all(a is b for a, b in zip(c_users, users, strict=True))
            if same_users and c_setting == setting and c_layout == layout(model_kwargs):
                for k, buf in buffers.items():
                    if torch.is_tensor(buf):
                        buf.copy_(model_kwargs[k])
                return run, rule
        buffers = {k: v.clone() if torch.is_tensor(v) else v for k, v in model_kwargs.items()}
        step, rule = self._step(sampler, model, x, clip_denoised, denoised_fn, cond_fn, buffers, eta)
        step.prepare(x)
        run = build_engine(engine, step, x.device)
        # One entry: a diffusion object keeps at most one compiled or captured step alive.
        self._cache["compat-engine"] = (users, setting, layout(model_kwargs), buffers, run, rule)
        return run, rule

    def _one_step(self, sampler, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta):
        step, rule = self._step(sampler, model, x, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta)
        noise = _draw_like(x)
        sample, pred_xstart, _ = step(x, t, noise if rule.needs_noise else None, rule.init_state(x))
        return {"sample": sample, "pred_xstart": pred_xstart}

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ) -> dict:
        """x_{t-1} ~ p(x_{t-1} | x_t) (classifier guidance on the mean): {"sample", "pred_xstart"}."""
        return self._one_step("ddpm", model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, 0.0)

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0
    ) -> dict:
        """One DDIM step (guidance on the score); draws its noise even at eta=0, as the original."""
        return self._one_step("ddim", model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta)

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ) -> dict:
        """x_{t+1} from x_t along the deterministic DDIM ODE (inversion); draws nothing."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample follows the deterministic ODE only: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        alpha_bar_next = torch.from_numpy(self.alphas_cumprod_next).to(x.device)[t].to(x.dtype)
        alpha_bar_next = alpha_bar_next.view(-1, *([1] * (x.ndim - 1)))
        sample = out["pred_xstart"] * alpha_bar_next.sqrt() + (1 - alpha_bar_next).sqrt() * out["eps"]
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ---------------------------------------------------------------- loops

    def _progressive(
        self,
        sampler,
        model,
        shape,
        noise,
        clip_denoised,
        denoised_fn,
        cond_fn,
        model_kwargs,
        device,
        progress,
        eta=0.0,
    ) -> Iterator[dict]:
        if not isinstance(shape, tuple | list):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if device is None:
            device = _model_device(model)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        engine = loop_engine(x.device)
        if engine == "eager":
            run, rule = self._step(sampler, model, x, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta)
            run.prepare(x)
        else:
            run, rule = self._engine_step(
                engine, sampler, model, x, clip_denoised, denoised_fn, cond_fn, model_kwargs or {}, eta
            )

        def every_step_draws(x, t, noise, state):
            if noise is None:
                _draw_like(x)  # the original draws at every step, used or not
            return run(x, t, noise, state)

        for _, x, pred_xstart in run_steps(
            self, every_step_draws, rule, x, lambda i, x: _draw_like(x), progress=progress, desc=sampler
        ):
            if engine != "eager":  # an engine may reuse its output buffers at the next step
                x, pred_xstart = x.clone(), pred_xstart.clone()
            yield {"sample": x, "pred_xstart": pred_xstart}

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Yield {"sample", "pred_xstart"} after each ancestral step."""
        return self._progressive(
            "ddpm", model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
        )

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """The final sample of ancestral sampling."""
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Yield {"sample", "pred_xstart"} after each DDIM step."""
        return self._progressive(
            "ddim",
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            cond_fn,
            model_kwargs,
            device,
            progress,
            eta,
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """The final sample of DDIM sampling."""
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta
            )
        )

    # ---------------------------------------------------------------- likelihood

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) per sample, in bits per dimension."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)

    def _model_vb_terms(self, model, x_start, x_t, t, clip_denoised, model_kwargs) -> dict:
        """The VLB term at t (decoder NLL at t=0) of ``model``'s prediction, in bits, and its x_0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        output = torch.where(t == 0, mean_flat(nll), kl) / np.log(2.0)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None) -> dict:
        """The whole variational bound in bits per dim, as image_nll.py reports it: total_bpd,
        prior_bpd, and per-step [N, T] vb, xstart_mse and mse (one ``randn_like`` per step)."""
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._model_vb_terms(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_all = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_all.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_all,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


def _last_sample(steps: Iterator[dict]):
    return deque(steps, maxlen=1)[0]["sample"]


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """script_util's keyword builder of the (respaced) process."""
    config = DiffusionConfig(
        steps=steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
    )
    return SpacedDiffusion.from_config(config, timestep_respacing)


def _diffusion(f: dict) -> SpacedDiffusion:
    """The process of a bound flag dict (the builders' diffusion flags)."""
    return create_gaussian_diffusion(
        steps=f["diffusion_steps"],
        timestep_respacing=f["timestep_respacing"],
        **{
            k: f[k]
            for k in gd_flags.diffusion_defaults()
            if k not in ("diffusion_steps", "timestep_respacing")
        },
    )


def _network(kind: str, flags: dict):
    return build_network(gd_flags.configs_from_flags(kind, flags)[0])


def diffusion_defaults() -> dict:
    return gd_flags.diffusion_defaults()


def model_and_diffusion_defaults() -> dict:
    return {**gd_flags.model_defaults(), **gd_flags.diffusion_defaults()}


def classifier_defaults() -> dict:
    return gd_flags.classifier_defaults()


def classifier_and_diffusion_defaults() -> dict:
    return {**gd_flags.classifier_defaults(), **gd_flags.diffusion_defaults()}


def sr_model_and_diffusion_defaults() -> dict:
    """In the original's order: model_and_diffusion_defaults() less the flags the super-resolution
    builder lacks, then large_size and small_size."""
    values = {**gd_flags.sr_defaults(), **gd_flags.diffusion_defaults()}
    names = [k for k in model_and_diffusion_defaults() if k in _SR_MODEL_AND_DIFFUSION_ORDER]
    return {k: values[k] for k in [*names, "large_size", "small_size"]}


# Positional parameter orders of the original builders (their signatures list every flag).
_MODEL_AND_DIFFUSION_ORDER = (
    "image_size class_cond learn_sigma num_channels num_res_blocks channel_mult num_heads"
    " num_head_channels num_heads_upsample attention_resolutions dropout diffusion_steps noise_schedule"
    " timestep_respacing use_kl predict_xstart rescale_timesteps rescale_learned_sigmas use_checkpoint"
    " use_scale_shift_norm resblock_updown use_fp16 use_new_attention_order"
).split()
_CLASSIFIER_ORDER = (
    "image_size classifier_use_fp16 classifier_width classifier_depth classifier_attention_resolutions"
    " classifier_use_scale_shift_norm classifier_resblock_updown classifier_pool"
).split()
_CLASSIFIER_AND_DIFFUSION_ORDER = (
    _CLASSIFIER_ORDER
    + (
        "learn_sigma diffusion_steps noise_schedule timestep_respacing use_kl predict_xstart"
        " rescale_timesteps rescale_learned_sigmas"
    ).split()
)
_SR_MODEL_AND_DIFFUSION_ORDER = (
    "large_size small_size class_cond learn_sigma num_channels num_res_blocks num_heads num_head_channels"
    " num_heads_upsample attention_resolutions dropout diffusion_steps noise_schedule timestep_respacing"
    " use_kl predict_xstart rescale_timesteps rescale_learned_sigmas use_checkpoint use_scale_shift_norm"
    " resblock_updown use_fp16"
).split()
_SR_MODEL_ORDER = (
    "large_size small_size num_channels num_res_blocks learn_sigma class_cond use_checkpoint"
    " attention_resolutions num_heads num_head_channels num_heads_upsample use_scale_shift_norm dropout"
    " resblock_updown use_fp16"
).split()
# create_model's own defaults (not model_and_diffusion_defaults'): image_size, num_channels and
# num_res_blocks have none.
_CREATE_MODEL_DEFAULTS = dict(
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)
_CREATE_MODEL_ORDER = ["image_size", "num_channels", "num_res_blocks", *_CREATE_MODEL_DEFAULTS]


def _bind(name: str, order: list[str], defaults: dict, args: tuple, flags: dict) -> dict:
    """Positional and keyword flags over their defaults, by the original's parameter order.

    A flag missing from ``defaults`` is required; unknown or doubled names are a TypeError, as
    for the original's signatures.
    """
    if len(args) > len(order):
        raise TypeError(f"{name}() takes {len(order)} positional arguments but {len(args)} were given")
    doubled = sorted(set(order[: len(args)]) & set(flags))
    if doubled:
        raise TypeError(f"{name}() got multiple values for: {', '.join(doubled)}")
    unknown = sorted(set(flags) - set(order))
    if unknown:
        raise TypeError(f"{name}() got unexpected flag(s): {', '.join(unknown)}")
    bound = {**defaults, **dict(zip(order, args, strict=False)), **flags}
    missing = [k for k in order if k not in bound]
    if missing:
        raise TypeError(f"{name}() missing flag(s): {', '.join(missing)}")
    return bound


def create_model(*args, **flags):
    """The ADM UNet from the original create_model's arguments (NUM_CLASSES labels if class_cond)."""
    f = _bind("create_model", _CREATE_MODEL_ORDER, _CREATE_MODEL_DEFAULTS, args, flags)
    return _network("diffusion", {**f, "num_classes": NUM_CLASSES})


def create_model_and_diffusion(*args, **flags):
    """-> (UNetModel, SpacedDiffusion); missing flags take ``model_and_diffusion_defaults()``."""
    f = _bind(
        "create_model_and_diffusion", _MODEL_AND_DIFFUSION_ORDER, model_and_diffusion_defaults(), args, flags
    )
    model = create_model(**{k: f[k] for k in _CREATE_MODEL_ORDER})
    return model, _diffusion(f)


def create_classifier(*args, **flags):
    """The noisy-image classifier (EncoderUNetModel); 1000 logits whatever NUM_CLASSES says, as in
    the original."""
    f = _bind("create_classifier", _CLASSIFIER_ORDER, classifier_defaults(), args, flags)
    return _network("classifier", {**f, "num_classes": 1000})


def create_classifier_and_diffusion(*args, **flags):
    """-> (EncoderUNetModel, SpacedDiffusion) from ``classifier_and_diffusion_defaults()`` flags."""
    f = _bind(
        "create_classifier_and_diffusion",
        _CLASSIFIER_AND_DIFFUSION_ORDER,
        classifier_and_diffusion_defaults(),
        args,
        flags,
    )
    classifier = create_classifier(**{k: f[k] for k in _CLASSIFIER_ORDER})
    return classifier, _diffusion(f)


def sr_create_model(*args, **flags):
    """The ADM-U upsampler from the original sr_create_model's (all required) arguments."""
    f = _bind("sr_create_model", _SR_MODEL_ORDER, {}, args, flags)
    return _network("superres", {**f, "num_classes": NUM_CLASSES})


def sr_create_model_and_diffusion(*args, **flags):
    """-> (SuperResModel, SpacedDiffusion); missing flags take ``sr_model_and_diffusion_defaults()``."""
    f = _bind(
        "sr_create_model_and_diffusion",
        _SR_MODEL_AND_DIFFUSION_ORDER,
        sr_model_and_diffusion_defaults(),
        args,
        flags,
    )
    model = sr_create_model(**{k: f[k] for k in _SR_MODEL_ORDER})
    return model, _diffusion(f)


def str2bool(v) -> bool:
    """argparse type of boolean flags: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in gd_flags.TRUE_WORDS:
        return True
    if v.lower() in gd_flags.FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError("boolean value expected")


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: dict) -> None:
    """One ``--name`` option per entry, typed by its default (str for None, str2bool for bools)."""
    for name, value in default_dict.items():
        kind = str if value is None else str2bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", default=value, type=kind)


def args_to_dict(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys}
