"""The Gaussian diffusion process: forward noising, the model's reverse step, training losses.

Semantics follow guided-diffusion's GaussianDiffusion + SpacedDiffusion (one class here: a
respaced process is the same class with new betas and a ``timestep_map``). Tables are float64
numpy, as the original computes them; per-step values are gathered from device copies of the
tables, cached per (device, dtype), so a sampling loop never copies host->device or syncs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ..config import unknown_choice
from .config import DiffusionConfig
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .schedule import get_named_beta_schedule, kept_steps, respace_betas

MEAN_TYPES = ("eps", "x0")
VAR_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")

# Per-step tables (float64 numpy attributes) that get device copies.
_TABLES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension (per-sample loss terms)."""
    return x.mean(dim=list(range(1, x.ndim)))


def _returning(output: Tensor) -> Callable[..., Tensor]:
    """A model that returns ``output`` whatever it is given (a computed output's VLB term)."""
    return lambda *_args, **_kwargs: output


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> str:
    if not (isinstance(value, str) and value in choices):
        raise ValueError(unknown_choice(kind, value, choices))
    return value


class GaussianDiffusion:
    """A (possibly respaced) diffusion process of ``num_timesteps`` steps.

    ``timestep_map[k]`` is the original step of respaced step ``k``; the model and guidance
    functions always see original steps (``model_timesteps``), as the network was trained on them.
    ``original_num_steps`` is the length of the process the map points into (needed to rescale
    timesteps to 0..1000).
    """

    def __init__(
        self,
        betas,
        model_mean_type: str = "eps",
        model_var_type: str = "fixed_large",
        loss_type: str = "mse",
        rescale_timesteps: bool = False,
        timestep_map=None,
        original_num_steps: int | None = None,
    ):
        self.model_mean_type = _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
        self.model_var_type = _check_choice("model_var_type", model_var_type, VAR_TYPES)
        self.loss_type = _check_choice("loss_type", loss_type, LOSS_TYPES)
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(len(betas))
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        self.timestep_map = np.array(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != betas.shape:
            raise ValueError("timestep_map needs one original step per beta")
        if original_num_steps is None:
            original_num_steps = int(self.timestep_map[-1]) + 1
        self.original_num_steps = int(original_num_steps)

        self.betas = betas
        self.log_betas = np.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # "fixed_large" uses beta_t, but the posterior variance at t=0 for a better decoder NLL.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._cache: dict = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig, respacing: str | Iterable[int] = "") -> GaussianDiffusion:
        """The process guided-diffusion's ``create_gaussian_diffusion`` builds from the same
        settings, respaced by ``respacing`` (``space_timesteps``; empty keeps every step).

        The process is always rebuilt from the kept alpha_bar (even with no respacing), exactly
        as the original's SpacedDiffusion does, so the tables match to the last bit.
        """
        steps = config.steps
        base_betas = get_named_beta_schedule(config.noise_schedule, steps)
        if not isinstance(respacing, str | Iterable | None):  # 25 was "'int' object is not iterable"
            raise ValueError(
                f"respacing must be a string such as 'ddim25' or '250', or a list of step counts, "
                f"got {type(respacing).__name__} {respacing!r}"
            )
        try:  # "0" was "betas must be 1-D with at least 2 steps, got shape (0,)"
            kept = kept_steps(steps, respacing or [steps])
        except ValueError as e:
            raise ValueError(f"respacing {respacing!r} of a {steps}-step process: {e}") from None
        betas, timestep_map = respace_betas(np.cumprod(1.0 - base_betas, axis=0), kept)
        return cls(
            betas,
            model_mean_type="x0" if config.predict_xstart else "eps",
            model_var_type=config.model_var_type,
            loss_type=config.loss_type,
            rescale_timesteps=config.rescale_timesteps,
            timestep_map=timestep_map,
            original_num_steps=steps,
        )

    # ---------------------------------------------------------------- device tables

    def tables(self, device, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Device copies of the process tables (names in ``_TABLES``) in ``dtype``, cached per
        (device, dtype): one host->device copy per process, none inside a sampling loop."""
        key = ("process", torch.device(device), dtype)
        tables = self._cache.get(key)
        if tables is None:
            tables = {
                name: torch.from_numpy(getattr(self, name)).to(device=device, dtype=dtype) for name in _TABLES
            }
            self._cache[key] = tables
        return tables

    def _extract(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Per-sample values of a table at steps ``t``, shaped to broadcast against ``x``."""
        values = self.tables(x.device, x.dtype)[name][t]
        return values.view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps the network sees for respaced steps ``t``: the original steps, or
        float steps on a 0..1000 scale when ``rescale_timesteps``."""
        key = ("timesteps", t.device)
        maps = self._cache.get(key)
        if maps is None:
            steps = torch.as_tensor(self.timestep_map)
            maps = (steps.to(t.device), (steps.float() * (1000.0 / self.original_num_steps)).to(t.device))
            self._cache[key] = maps
        return maps[1][t] if self.rescale_timesteps else maps[0][t]

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) (``t`` counts from 0 = one step of noise)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand(x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---------------------------------------------------------------- reverse process

    def p_mean_variance(
        self,
        model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Run ``model(x, model_timesteps(t), **model_kwargs)`` and turn its output into
        p(x_{t-1} | x_t): see ``p_mean_variance_from_output``."""
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(
        self,
        model_output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """mean, variance, log_variance, pred_xstart, eps and model_output for a raw output.

        ``denoised_fn`` then clipping to [-1, 1] apply to pred_xstart; ``eps`` is the noise
        implied by that processed pred_xstart (what DDIM steps with).
        """
        n, c = x.shape[:2]
        if self.model_var_type in ("learned", "learned_range"):
            if model_output.shape != (n, 2 * c, *x.shape[2:]):
                raise ValueError(
                    f"a learned-sigma model must output {2 * c} channels, got {tuple(model_output.shape)}"
                )
            mean_output, var_values = torch.split(model_output, c, dim=1)
            if self.model_var_type == "learned":
                log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                # The model outputs [-1, 1] for [min_var, max_var] (log-interpolated).
                frac = (var_values + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            mean_output = model_output
            if self.model_var_type == "fixed_large":
                variance = self._extract("fixed_large_variance", t, x).expand(x.shape)
                log_variance = self._extract("fixed_large_log_variance", t, x).expand(x.shape)
            else:
                variance = self._extract("posterior_variance", t, x).expand(x.shape)
                log_variance = self._extract("posterior_log_variance_clipped", t, x).expand(x.shape)

        if self.model_mean_type == "x0":
            pred_xstart = mean_output
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": self.predict_eps_from_xstart(x, t, pred_xstart),
            "model_output": model_output,
        }

    def condition_mean(
        self, cond_fn, out: dict, x: Tensor, t: Tensor, model_kwargs: dict | None = None
    ) -> Tensor:
        """Guided mean for ancestral sampling: mean + variance * grad log p(y | x_t)
        (Sohl-Dickstein et al. 2015, as guided-diffusion's p_sample)."""
        gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        return out["mean"] + out["variance"] * gradient.to(out["mean"].dtype)

    def condition_score(
        self,
        cond_fn,
        out: dict,
        x: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        *,
        clip_denoised: bool = False,
    ) -> dict:
        """``out`` with the score shifted by the guidance gradient (Song et al. 2020):
        eps' = eps - sqrt(1 - alpha_bar) * grad, and pred_xstart / mean / eps re-derived from it.
        ``clip_denoised`` clips that guided pred_xstart to [-1, 1] (guided-diffusion clips ``out``'s
        before guiding; DPM-Solver++ after)."""
        gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        alpha_bar = self._extract("alphas_cumprod", t, x)
        eps = out["eps"] - (1 - alpha_bar).sqrt() * gradient.to(x.dtype)
        guided = dict(out)
        guided["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            guided["pred_xstart"] = guided["pred_xstart"].clamp(-1, 1)
        guided["mean"], _, _ = self.q_posterior_mean_variance(guided["pred_xstart"], x, t)
        # Re-derived from pred_xstart, as the original DDIM step does after condition_score.
        guided["eps"] = self.predict_eps_from_xstart(x, t, guided["pred_xstart"])
        return guided

    # ---------------------------------------------------------------- training losses

    def _vb_terms_bpd(
        self,
        model,
        x_start: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample VLB term of ``model`` in bits as "output": KL(q(x_{t-1}|x_t,x_0) ||
        p(x_{t-1}|x_t)), or the decoder NLL at t == 0; and its "pred_xstart" (guided-diffusion's
        signature, which user code calls)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self, model, x_start: Tensor, t: Tensor, model_kwargs: dict | None = None, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sample losses at steps ``t`` under guided-diffusion's keys.

        "kl"/"rescaled_kl": ``loss`` is the VLB term (times num_timesteps when rescaled).
        "mse"/"rescaled_mse": ``mse`` on eps (or x0); with learned sigma also ``vb``, the VLB
        term computed with the mean output frozen so it trains only the variance (scaled by
        num_timesteps / 1000 for rescaled_mse); ``loss`` = mse (+ vb).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        terms = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(_returning(model_output), x_start, x_t, t, False)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.model_var_type in ("learned", "learned_range"):
            c = x_t.shape[1]
            if model_output.shape[1] != 2 * c:
                raise ValueError(
                    f"a learned-sigma model must output {2 * c} channels, got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, c, dim=1)
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(_returning(frozen), x_start, x_t, t, False)["output"]
            if self.loss_type == "rescaled_mse":
                # Keeps the VB term's weight what it was for 1000-step training.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.model_mean_type == "x0" else noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
