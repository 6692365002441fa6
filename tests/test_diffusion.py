"""The Gaussian process: forward noising, posterior, p_mean_variance and the training losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import diffusion_from_flags, make_diffusion

from fastdiff.diffusion import GaussianDiffusion
from fastdiff.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

SHAPE = (3, 2, 4, 4)


def _diffusion(**kw) -> GaussianDiffusion:
    return make_diffusion(steps=50, **kw)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(SHAPE, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(SHAPE, generator=g, dtype=dtype)
    t = torch.tensor([0, 17, 49])
    return x0, noise, t


def _col(values, t):
    return torch.from_numpy(values)[t].view(-1, 1, 1, 1)


def test_q_sample_closed_form():
    d = _diffusion(noise_schedule="cosine")
    x0, noise, t = _data()
    ab = _col(d.alphas_cumprod, t)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    mean, var, logvar = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, ab.sqrt() * x0)
    torch.testing.assert_close(var, (1 - ab).expand(SHAPE))
    torch.testing.assert_close(logvar, torch.log(1 - ab).expand(SHAPE))


def test_q_posterior_is_bayes_product():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision and mean of the product."""
    d = _diffusion()
    x0, noise, t = _data()
    t = t.clamp(min=1)
    xt = d.q_sample(x0, t, noise)
    beta, abp = _col(d.betas, t), _col(d.alphas_cumprod_prev, t)
    var = 1 / ((1 - beta) / beta + 1 / (1 - abp))
    mean_ref = var * ((1 - beta).sqrt() / beta * xt + abp.sqrt() / (1 - abp) * x0)
    mean, variance, logvar = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(variance, var.expand(SHAPE))
    torch.testing.assert_close(logvar, var.log().expand(SHAPE))


def test_eps_and_xstart_roundtrip():
    d = _diffusion(noise_schedule="cosine")
    x0, noise, t = _data()
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, noise), x0)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), noise)


def _oracle(d, x0, noise, extra=None, x0_pred=False):
    """A "model" returning the true eps (or x0), optionally with variance channels."""

    def model(x, t_model, **_):
        out = x0 if x0_pred else noise
        return out if extra is None else torch.cat([out, extra], dim=1)

    return model


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_p_mean_variance_fixed(var_type):
    d = GaussianDiffusion(make_diffusion(steps=50).betas, model_var_type=var_type)
    x0, noise, t = _data()
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(_oracle(d, x0, noise), xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0)
    torch.testing.assert_close(out["eps"], noise)
    torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(x0, xt, t)[0])
    # The variances from the betas alone (DDPM eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t),
    # not from the process's own tables.
    betas = np.linspace(1e-4, 0.02, 50) * 1000 / 50  # the linear schedule at 50 steps
    np.testing.assert_allclose(d.betas, betas)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    posterior = (1 - abar_prev) / (1 - abar) * betas  # 0 at t == 0
    if var_type == "fixed_small":  # the log is clipped at t == 0, where the variance is 0
        expected = _col(posterior, t)
        expected_log = _col(np.log(np.concatenate([[posterior[1]], posterior[1:]])), t)
    else:  # beta_t, with the posterior variance at t == 0 (a better decoder NLL)
        expected = _col(np.concatenate([[posterior[1]], betas[1:]]), t)
        expected_log = expected.log()
    torch.testing.assert_close(out["variance"], expected.expand(SHAPE))
    torch.testing.assert_close(out["log_variance"], expected_log.expand(SHAPE))


def test_p_mean_variance_learned_range_and_learned():
    d = _diffusion(learn_sigma=True)
    x0, noise, t = _data()
    xt = d.q_sample(x0, t, noise)
    lo = _col(d.posterior_log_variance_clipped, t).expand(SHAPE)
    hi = _col(np.log(d.betas), t).expand(SHAPE)
    for v, expected in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2)):
        out = d.p_mean_variance(_oracle(d, x0, noise, torch.full(SHAPE, v, dtype=x0.dtype)), xt, t, False)
        torch.testing.assert_close(out["log_variance"], expected)
        torch.testing.assert_close(out["variance"], expected.exp())
    learned = GaussianDiffusion(d.betas, model_var_type="learned")
    logvar = torch.randn(SHAPE, dtype=x0.dtype)
    out = learned.p_mean_variance(_oracle(d, x0, noise, logvar), xt, t, False)
    torch.testing.assert_close(out["log_variance"], logvar)
    with pytest.raises(ValueError, match="6 channels|4 channels"):
        d.p_mean_variance(_oracle(d, x0, noise), xt, t)


def test_x0_prediction_clip_and_denoised_fn():
    d = _diffusion(predict_xstart=True)
    x0, noise, t = _data()
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(_oracle(d, 3 * x0, noise, x0_pred=True), xt, t, clip_denoised=True)
    torch.testing.assert_close(out["pred_xstart"], (3 * x0).clamp(-1, 1))
    # denoised_fn runs before clipping.
    out = d.p_mean_variance(
        _oracle(d, x0, noise, x0_pred=True), xt, t, clip_denoised=True, denoised_fn=lambda v: v * 10
    )
    torch.testing.assert_close(out["pred_xstart"], (10 * x0).clamp(-1, 1))
    torch.testing.assert_close(out["eps"], d.predict_eps_from_xstart(xt, t, out["pred_xstart"]))


def test_model_called_with_original_timesteps():
    d = make_diffusion(steps=1000, timestep_respacing="ddim10", rescale_timesteps=True)
    seen = []

    def model(x, t_model):
        seen.append(t_model)
        return torch.zeros_like(x)

    x = torch.zeros(2, 1, 2, 2)
    d.p_mean_variance(model, x, torch.tensor([9, 3]))
    assert seen[0].tolist() == [900.0, 300.0]


def test_mse_losses_and_frozen_vb():
    x0, noise, t = _data(torch.float32)
    d = make_diffusion(steps=50)
    losses = d.training_losses(_oracle(d, x0, noise), x0, t, noise=noise)
    assert set(losses) == {"mse", "loss"}
    torch.testing.assert_close(losses["loss"], torch.zeros(3))

    x0_model = make_diffusion(steps=50, predict_xstart=True)
    x0_terms = x0_model.training_losses(_oracle(d, x0, noise, x0_pred=True), x0, t, noise=noise)
    torch.testing.assert_close(x0_terms["mse"], torch.zeros(3))

    out = torch.nn.Parameter(torch.randn(3, 4, 4, 4))
    learned = make_diffusion(steps=50, learn_sigma=True)
    terms = learned.training_losses(lambda x, t_model: out, x0, t, noise=noise)
    assert set(terms) == {"mse", "vb", "loss"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], ((out[:, :2] - noise) ** 2).mean(dim=(1, 2, 3)))
    terms["vb"].sum().backward()
    assert (out.grad[:, :2] == 0).all() and (out.grad[:, 2:] != 0).any()  # the mean is frozen in vb

    rescaled = make_diffusion(steps=50, learn_sigma=True, rescale_learned_sigmas=True)
    with torch.no_grad():
        rterms = rescaled.training_losses(lambda x, t_model: out, x0, t, noise=noise)
    torch.testing.assert_close(rterms["vb"], terms["vb"].detach() * 50 / 1000)


def test_kl_losses_and_decoder_nll():
    x0, noise, t = _data(torch.float32)
    out = torch.randn(3, 4, 4, 4)
    kl = make_diffusion(steps=50, learn_sigma=True, use_kl=True)
    assert kl.loss_type == "rescaled_kl"
    plain = GaussianDiffusion(kl.betas, model_var_type="learned_range", loss_type="kl")
    mse = make_diffusion(steps=50, learn_sigma=True)
    ref = mse.training_losses(lambda x, t_model: out, x0, t, noise=noise)["vb"]
    loss = plain.training_losses(lambda x, t_model: out, x0, t, noise=noise)
    assert set(loss) == {"loss"}
    torch.testing.assert_close(loss["loss"], ref)
    rescaled = kl.training_losses(lambda x, t_model: out, x0, t, noise=noise)["loss"]
    torch.testing.assert_close(rescaled, ref * 50)

    # At t == 0 the term is the decoder NLL in bits.
    xt = plain.q_sample(x0, t, noise)
    p = plain.p_mean_variance(lambda x, t_model: out, xt, t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
    torch.testing.assert_close(ref[0], nll[0].mean() / math.log(2.0))


def test_normal_kl_and_likelihood():
    m, lv = torch.tensor([0.3]), torch.tensor([0.2])
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(1))
    expected = 0.5 * (-1.0 + 0.0 - 0.2 + math.exp(0.2) + 0.3**2)  # vs N(0, 1), scalars broadcast
    torch.testing.assert_close(normal_kl(m, lv, 0.0, 0.0), torch.tensor([expected]))
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(
        approx_standard_normal_cdf(x), 0.5 * (1 + torch.erf(x / math.sqrt(2))), atol=1e-3, rtol=0
    )
    # Over all 256 bins the discretized likelihood sums to one.
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0), (0.0, 0.5)):
        lp = discretized_gaussian_log_likelihood(
            bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
        )
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_tables_cached_per_device_and_dtype():
    d = _diffusion()
    a = d.tables("cpu", torch.float32)
    assert d.tables(torch.device("cpu"), torch.float32) is a
    b = d.tables("cpu", torch.float64)
    assert b is not a and b["alphas_cumprod"].dtype == torch.float64
    np.testing.assert_array_equal(b["alphas_cumprod"].numpy(), d.alphas_cumprod)
    assert a["alphas_cumprod"].dtype == torch.float32


def test_invalid_types_rejected():
    betas = make_diffusion(steps=50).betas
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion(betas, model_var_type="small")
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(betas, loss_type="l1")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.5, 1.5]))


def test_linear_schedule_below_20_steps_is_refused_whatever_the_respacing():
    """Its betas end at 20 / steps, above 1 below 20 steps: guided-diffusion refuses the full
    process before respacing it; respacing alone used to hide the negative alphas (fuzz seed 131:
    --diffusion_steps 10 --timestep_respacing ddim5 built a process from them)."""
    from fastdiff.compat import guided_diffusion as gd
    from fastdiff.compat import respace
    from fastdiff.config import ConfigError
    from fastdiff.diffusion.schedule import get_named_beta_schedule
    from fastdiff.models.flags import FlagError

    for respacing in ("", "ddim5", "3"):
        with pytest.raises(ConfigError, match="linear noise_schedule needs at least 20 timesteps"):
            gd.create_gaussian_diffusion(steps=10, timestep_respacing=respacing)
    with pytest.raises(FlagError, match="got --diffusion_steps 10"):
        diffusion_from_flags({"diffusion_steps": 10}, timestep_respacing="ddim5")
    betas = get_named_beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="betas must lie in"):  # the original's constructor
        respace.SpacedDiffusion(respace.space_timesteps(10, "ddim5"), betas=betas)
    assert gd.create_gaussian_diffusion(steps=20, timestep_respacing="ddim5").num_timesteps == 5
    assert make_diffusion(steps=10, noise_schedule="cosine", timestep_respacing="ddim5").num_timesteps == 5


def test_create_diffusion_from_flags():
    flags = {
        "diffusion_steps": 500,
        "learn_sigma": True,
        "noise_schedule": "cosine",
        "num_channels": 64,
        "rescale_learned_sigmas": True,
        "predict_xstart": True,
    }
    d = diffusion_from_flags(flags, timestep_respacing="50")
    assert d.num_timesteps == 50 and d.original_num_steps == 500
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == ("x0", "learned_range", "rescaled_mse")
    ref = make_diffusion(
        steps=500,
        learn_sigma=True,
        noise_schedule="cosine",
        predict_xstart=True,
        rescale_learned_sigmas=True,
        timestep_respacing="50",
    )
    np.testing.assert_array_equal(d.betas, ref.betas)
