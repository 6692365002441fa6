"""guided-diffusion's ``gaussian_diffusion`` names over fastdiff's process.

``GaussianDiffusion`` here is fastdiff's ``diffusion.gaussian.GaussianDiffusion`` (tables,
q_sample, p_mean_variance, training_losses) plus the original's sampling, inversion and
likelihood methods; ``respace.SpacedDiffusion`` and every process ``script_util`` builds are of
this class. The loops run fastdiff's one loop (``run_steps``) over the same ``SamplingStep`` the
CLI uses, but draw from the global RNG exactly what the original draws (x_T, then one
``randn_like`` per step even where the step does not use it), so a seed gives the original's
batches one after another. ``FASTDIFF_GD_ENGINE`` (eager by default; ``auto`` is the device's
default) picks the engine.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from ..diffusion import gaussian as diffusion
from ..diffusion.gaussian import mean_flat
from ..diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from ..diffusion.samplers import SamplingStep, make_rule, model_device, run_steps
from ..diffusion.schedule import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "betas_for_alpha_bar",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
]


class _Choice(str, enum.Enum):
    """A member equals, hashes and prints as its string (``enum.StrEnum`` before Python 3.11)."""

    __str__ = str.__str__
    __format__ = str.__format__


# The original's enums, valued by fastdiff's names of the same choices, so
# ``diffusion.model_var_type == ModelVarType.LEARNED_RANGE`` and fastdiff's own
# ``model_var_type in ("learned", "learned_range")`` both hold.
class ModelMeanType(_Choice):
    PREVIOUS_X = "previous_x"  # the original's, unused by its models; fastdiff refuses it
    START_X = "x0"
    EPSILON = "eps"


class ModelVarType(_Choice):
    LEARNED = "learned"
    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"


class LossType(_Choice):
    MSE = "mse"
    RESCALED_MSE = "rescaled_mse"
    KL = "kl"
    RESCALED_KL = "rescaled_kl"

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """``arr[timesteps]`` (a 1-D numpy table) as float32, broadcast to ``broadcast_shape``."""
    values = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return values.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


ENGINE_ENV = "FASTDIFF_GD_ENGINE"


def loop_engine(device) -> str:
    """The engine the compat loops run (``FASTDIFF_GD_ENGINE``): eager unless asked otherwise."""
    from ..engines import default_engine

    name = os.environ.get(ENGINE_ENV, "").strip() or "eager"
    return default_engine(torch.device(device)) if name == "auto" else name


def _draw_like(x: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(x)


class GaussianDiffusion(diffusion.GaussianDiffusion):
    """fastdiff's process with guided-diffusion's per-step, loop and likelihood methods.

    It takes the original's keywords (``betas=``, the enums below) as well as fastdiff's own, and
    reports its types as those enums (they are strings too, so fastdiff's code reads them).

    As in the original, ``cond_fn(x, t, **model_kwargs)`` returns the scaled gradient and is
    called with the original (or 0..1000-rescaled) timesteps, like the model. Unlike the
    original, a loop that produced NaN/Inf raises ``SamplingError`` after its last step. Every
    step draws its noise before the model runs (the original draws it after): the same numbers
    unless the model itself draws random numbers (dropout in train mode).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_mean_type = ModelMeanType(self.model_mean_type)
        self.model_var_type = ModelVarType(self.model_var_type)
        self.loss_type = LossType(self.loss_type)
        self.timestep_map = self.timestep_map.tolist()  # the original's type: scripts call .index()

    @property
    def use_timesteps(self) -> set[int]:
        """The original steps this process kept."""
        return {int(s) for s in self.timestep_map}

    @property
    def alphas_cumprod_next(self) -> np.ndarray:
        return np.append(self.alphas_cumprod[1:], 0.0)

    # The original's private names, which user code calls.
    _predict_xstart_from_eps = diffusion.GaussianDiffusion.predict_xstart_from_eps
    _predict_eps_from_xstart = diffusion.GaussianDiffusion.predict_eps_from_xstart

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """The x_0 whose posterior mean at ``t`` is ``xprev`` (the original's helper; fastdiff's
        processes predict eps or x_0, so nothing here calls it)."""
        coef1 = self.posterior_mean_coef1
        return (
            _extract_into_tensor(1.0 / coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / coef1, t, x_t.shape) * x_t
        )

    def _scale_timesteps(self, t):
        """The steps the model is given for ``t``, on 0..1000 when ``rescale_timesteps`` (user
        code calls ``model(x, diffusion._scale_timesteps(t))``); ``SpacedDiffusion`` returns ``t``,
        as the original's, whose model wrapper maps and scales instead."""
        return self.model_timesteps(t) if self.rescale_timesteps else t

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
        from ..runs.sampling import main_builds_first

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
        # under torchrun rank 0 exports a cached graph first and the other ranks load it; a
        # script's ranks reach a loop's build together (the same batches)
        run = main_builds_first(engine, lambda: build_engine(engine, step, x.device))
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
            device = model_device(model)
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

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None) -> dict:
        """The whole variational bound in bits per dim, as image_nll.py reports it: total_bpd,
        prior_bpd, and per-step [N, T] vb, xstart_mse and mse (one ``randn_like`` per step)."""
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
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
