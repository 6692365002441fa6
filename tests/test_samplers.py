"""Samplers on toy models: determinism, seeds, guidance semantics, DPM-Solver++ accuracy, NaN reports."""

from __future__ import annotations

import math

import pytest
import torch
from builders import make_diffusion
from torch import nn

from fastdiff.compat.guided_diffusion import create_gaussian_diffusion
from fastdiff.diffusion import SAMPLERS, ClassifierFreeGuidance, SamplingError, sample
from fastdiff.diffusion.samplers import DDPMStep, SamplingStep, make_rule, model_device, sample_steps

SHAPE = (2, 3, 4, 4)


class ToyModel(nn.Module):
    """A tiny conditional eps-model with the UNet's call signature."""

    def __init__(self, learn_sigma=False, num_classes=5):
        super().__init__()
        out = 3 * (2 if learn_sigma else 1)
        self.conv = nn.Conv2d(3, out, 3, padding=1)
        self.temb = nn.Linear(1, out)
        self.num_classes = num_classes
        self.emb = nn.Embedding(num_classes + 1, out) if num_classes else None

    def forward(self, x, t, y=None):
        h = self.conv(x) + self.temb(t.to(x.dtype).view(-1, 1) / 1000)[:, :, None, None]
        if y is not None:
            h = h + self.emb(y)[:, :, None, None]
        return torch.tanh(h)


class ToyClassifier(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 4 + 1, classes)

    def forward(self, x, t):
        return self.lin(torch.cat([x.flatten(1), t.float().view(-1, 1) / 1000], dim=1))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    diffusion = make_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="ddim8"
    )
    return diffusion, ToyModel(learn_sigma=True).eval(), ToyClassifier().eval(), {"y": torch.tensor([1, 3])}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_runs_and_seed_reproduces(setup, sampler):
    diffusion, model, _, kw = setup
    steps = []
    a = sample(
        diffusion,
        model,
        SHAPE,
        sampler=sampler,
        model_kwargs=kw,
        generator=_gen(3),
        callback=lambda i, x, x0: steps.append(i),
    )
    assert a.shape == SHAPE and torch.isfinite(a).all()
    assert steps == list(range(diffusion.num_timesteps))
    b = sample(diffusion, model, SHAPE, sampler=sampler, model_kwargs=kw, generator=_gen(3))
    assert torch.equal(a, b)
    c = sample(diffusion, model, SHAPE, sampler=sampler, model_kwargs=kw, generator=_gen(4))
    assert not torch.equal(a, c)


def test_ddim_eta0_is_deterministic_given_x_T(setup):
    diffusion, model, _, kw = setup
    x_T = torch.randn(SHAPE)
    a = sample(diffusion, model, SHAPE, model_kwargs=kw, noise=x_T, generator=_gen(1))
    b = sample(diffusion, model, SHAPE, model_kwargs=kw, noise=x_T, generator=_gen(2))
    assert torch.equal(a, b)
    c = sample(diffusion, model, SHAPE, eta=1.0, model_kwargs=kw, noise=x_T, generator=_gen(1))
    d = sample(diffusion, model, SHAPE, eta=1.0, model_kwargs=kw, noise=x_T, generator=_gen(2))
    assert not torch.equal(c, d)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_classifier_scale_zero_is_unguided(setup, sampler):
    diffusion, model, classifier, kw = setup
    plain = sample(diffusion, model, SHAPE, sampler=sampler, model_kwargs=kw, generator=_gen(5))
    zero = sample(
        diffusion,
        model,
        SHAPE,
        sampler=sampler,
        model_kwargs=kw,
        generator=_gen(5),
        classifier=classifier,
        classifier_scale=0.0,
    )
    guided = sample(
        diffusion,
        model,
        SHAPE,
        sampler=sampler,
        model_kwargs=kw,
        generator=_gen(5),
        classifier=classifier,
        classifier_scale=3.0,
    )
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_classifier_guidance_under_inference_mode(setup, sampler):
    """A notebook's ``with torch.inference_mode():`` gives the same guided samples as no_grad
    (the classifier's local graph raised on inference tensors: x, t and the labels)."""
    diffusion, model, classifier, kw = setup
    guided = dict(sampler=sampler, classifier=classifier, classifier_scale=3.0)
    want = sample(diffusion, model, SHAPE, model_kwargs=kw, generator=_gen(5), **guided)
    with torch.inference_mode():
        labels = {"y": kw["y"].clone()}  # an inference tensor too
        got = sample(diffusion, model, SHAPE, model_kwargs=labels, generator=_gen(5), **guided)
    assert torch.equal(got, want)


def test_sample_checks_its_arguments_before_any_step(setup):
    """One ValueError naming the argument before the model runs: DDIM's eta above 1 and a NaN
    guidance scale were a SamplingError after the whole loop, a generator that is no Generator an
    AttributeError, and x_T of another batch than the labels' a misleading error about the
    model's output channels."""
    diffusion, model, classifier, kw = setup

    def never(*args, **kwargs):
        raise AssertionError("a step ran")

    never.num_classes = model.num_classes
    for message, extra in (
        ("eta must be a finite number >= 0 and <= 1", {"eta": 5.0}),
        ("eta must be a finite number >= 0 and <= 1 .*got '0'", {"eta": "0"}),
        ("generator must be a torch.Generator, got int", {"generator": 0}),
        ("noise must have shape \\[2, 3, 4, 4\\], got \\[1, 3, 4, 4\\]", {"noise": torch.randn(1, 3, 4, 4)}),
        (
            "classifier_scale must be a finite number, got nan",
            {"classifier": classifier, "classifier_scale": math.nan},
        ),
        ("cfg_scale must be a finite number, got inf", {"cfg_scale": math.inf, "null_label": 5}),
    ):
        with pytest.raises(ValueError, match=message):
            sample(diffusion, never, SHAPE, model_kwargs=kw, **extra)


def test_sample_checks_labels_and_null_label_before_any_step(setup):
    """Labels out of the model's label table or the classifier's classes, of the wrong kind, shape
    or count, a null label beyond the table, a scale without a classifier: one ValueError before
    the loop (they were an IndexError from the embedding or the classifier's log-probabilities at
    the first step, or silently unguided samples). A model's num_classes is no bound: the toy's
    null label 5 lies beyond its 5 classes (test_classifier_free_guidance samples it)."""
    diffusion, model, classifier, kw = setup

    def never(*args, **kwargs):
        raise AssertionError("a step ran")

    never.num_classes, never.label_emb = 5, nn.Embedding(6, 1)
    classifier.num_classes = 5  # as fastdiff's classifiers say their logit count
    guided = {"classifier": classifier, "classifier_scale": 1.0}
    for message, extra in (
        ("label 6 out of range: the model has classes 0..5", {"model_kwargs": {"y": [1, 6]}}),
        ("label -1 out of range", {"model_kwargs": {"y": [-1, 0]}}),
        ("label 5 out of range: the classifier has classes 0..4", {"model_kwargs": {"y": [1, 5]}, **guided}),
        ("integer class ids, got dtype torch.float32", {"model_kwargs": {"y": torch.tensor([1.0, 2.0])}}),
        ("one class id per image \\(1-D\\), got shape \\[1, 2\\]", {"model_kwargs": {"y": [[1, 3]]}}),
        ("3 labels for 2 images", {"model_kwargs": {"y": [1, 2, 3]}}),
        ("null_label must be one of the model's 6 class ids, got 6", {"cfg_scale": 2.0, "null_label": 6}),
        ("null_label must be one of the model's 6 class ids, got 2.5", {"cfg_scale": 2.0, "null_label": 2.5}),
        ("classifier_scale needs a classifier", {"classifier_scale": 1.0}),
        ("callback must be callable, got int", {"callback": 3}),
        ("noise must be a floating-point tensor, got torch.int64", {"noise": torch.zeros(SHAPE).long()}),
        ("noise must be finite", {"noise": torch.full(SHAPE, math.inf)}),
        ("shape must be positive ints \\(N, C, H, W\\), got \\(2, 3, 0, 4\\)", {"shape": (2, 3, 0, 4)}),
        ("shape must be positive ints", {"shape": (2, 3, 4.0, 4)}),
        ("shape must be positive ints", {"shape": (4, 4)}),  # was a SamplingError at the end
    ):
        with pytest.raises(ValueError, match=message):
            sample(diffusion, never, **{"shape": SHAPE, "model_kwargs": kw, **extra})
    # a list of ids is labels as a tensor is
    want = sample(diffusion, model, SHAPE, model_kwargs=kw, generator=_gen(1))
    got = sample(diffusion, model, SHAPE, model_kwargs={"y": kw["y"].tolist()}, generator=_gen(1))
    assert torch.equal(got, want)


def test_guidance_gets_original_timesteps_and_generic_cond_fn(setup):
    """A guided-diffusion style cond_fn and ClassifierGuidance take the same path."""
    diffusion, model, classifier, kw = setup
    seen = []

    def cond_fn(x, t, y=None):
        seen.append(t.tolist())
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = torch.log_softmax(classifier(x_in, t), dim=-1)[range(len(x)), y]
            return torch.autograd.grad(lp.sum(), x_in)[0] * 2.0

    compat = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="ddim8"
    )
    x_T = torch.randn(SHAPE)
    a = compat.ddim_sample_loop(model, SHAPE, noise=x_T, cond_fn=cond_fn, model_kwargs=kw)
    b = sample(
        diffusion, model, SHAPE, noise=x_T, model_kwargs=kw, classifier=classifier, classifier_scale=2.0
    )
    assert torch.equal(a, b)
    assert [s[0] for s in seen] == [875, 750, 625, 500, 375, 250, 125, 0]


def test_guidance_formulas_single_step(setup):
    """DDPM shifts the mean by variance * grad; DDIM shifts eps by -sqrt(1 - abar) * grad."""
    diffusion, model, _, kw = setup
    x = torch.randn(SHAPE)
    t = torch.full((2,), 5)
    grad = torch.randn(SHAPE)

    def cond_fn(x, t, **_):
        return grad

    for name in ("ddpm", "ddim"):
        rule = make_rule(diffusion, name)
        zeros = torch.zeros(SHAPE)
        plain = SamplingStep(diffusion, model, rule, model_kwargs=kw)(x, t, zeros, None)[0]
        guided = SamplingStep(diffusion, model, rule, model_kwargs=kw, cond_fn=cond_fn)(x, t, zeros, None)[0]
        out = diffusion.p_mean_variance(model, x, t, model_kwargs=kw)
        if name == "ddpm":
            torch.testing.assert_close(guided - plain, out["variance"] * grad)
        else:
            abar, abar_prev = diffusion.alphas_cumprod[5], diffusion.alphas_cumprod_prev[5]
            # x_prev = sqrt(abp) x0 + sqrt(1-abp) eps with x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
            slope = (1 - abar_prev) ** 0.5 - abar_prev**0.5 * (1 - abar) ** 0.5 / abar**0.5
            expected = slope * -((1 - abar) ** 0.5) * grad
            torch.testing.assert_close(guided - plain, expected, atol=1e-5, rtol=1e-4)


def test_ddpm_step_adds_no_noise_at_t0(setup):
    diffusion = setup[0]
    out = {"mean": torch.ones(SHAPE), "log_variance": torch.zeros(SHAPE)}
    x_next, _ = DDPMStep(diffusion)(out, torch.zeros(SHAPE), torch.tensor([0, 3]), torch.ones(SHAPE), None)
    assert torch.equal(x_next[0], torch.ones(SHAPE[1:])) and torch.equal(x_next[1], 2 * torch.ones(SHAPE[1:]))


def test_ddim_eta_matches_formula(setup):
    diffusion, model, _, kw = setup
    x, noise, k = torch.randn(SHAPE), torch.randn(SHAPE), 4
    t = torch.full((2,), k)
    rule = make_rule(diffusion, "ddim", eta=0.7)
    x_prev = SamplingStep(diffusion, model, rule, model_kwargs=kw)(x, t, noise, None)[0]
    out = diffusion.p_mean_variance(model, x, t, model_kwargs=kw)
    ab, abp = diffusion.alphas_cumprod[k], diffusion.alphas_cumprod_prev[k]
    sigma = 0.7 * ((1 - abp) / (1 - ab)) ** 0.5 * (1 - ab / abp) ** 0.5
    eps = (x / ab**0.5 - out["pred_xstart"]) / (1 / ab - 1) ** 0.5
    ref = out["pred_xstart"] * abp**0.5 + (1 - abp - sigma**2) ** 0.5 * eps + sigma * noise
    torch.testing.assert_close(x_prev, ref)


def test_ddim_coefficients_are_the_originals_float32_arithmetic_to_the_bit():
    """float32 ops on float32 alpha-bars, as guided-diffusion's ddim_sample computes them: float64
    tables rounded once differed in the last bit (8 of 25 sqrt(abar_prev) here), which moved a
    seeded script's pixels by a level."""
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule="cosine", timestep_respacing="ddim25", learn_sigma=True
    )
    rule = make_rule(diffusion, "ddim", eta=0.7)
    ab, abp = (torch.from_numpy(a).float() for a in (diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev))
    sigma = 0.7 * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    assert torch.equal(rule.c_x0, torch.sqrt(abp))
    assert torch.equal(rule.c_eps, torch.sqrt(1 - abp - sigma**2))
    assert torch.equal(rule.sigma, sigma)


def test_ddim_coefficients_of_a_float64_run_are_float64_arithmetic():
    """float32's 1 - alpha_bar near t = 0 is off by 1e-3 relative (cosine, 5 steps), which moved a
    float64 DDIM sample by up to 3e-3 mid-run against the same arithmetic in float64."""
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule="cosine", timestep_respacing="5", learn_sigma=True
    )
    rule = make_rule(diffusion, "ddim", eta=0.7, dtype=torch.float64)
    ab, abp = (torch.from_numpy(a) for a in (diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev))
    sigma = 0.7 * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    assert torch.equal(rule.c_x0, torch.sqrt(abp))
    assert torch.equal(rule.c_eps, torch.sqrt(1 - abp - sigma**2))
    assert torch.equal(rule.sigma, sigma)


def test_classifier_free_guidance(setup):
    diffusion, model, _, kw = setup
    x_T = torch.randn(SHAPE)
    cond = sample(diffusion, model, SHAPE, model_kwargs=kw, noise=x_T)
    w1 = sample(diffusion, model, SHAPE, model_kwargs=kw, noise=x_T, cfg_scale=1.0, null_label=5)
    torch.testing.assert_close(w1, cond, atol=1e-5, rtol=1e-5)
    w0 = sample(diffusion, model, SHAPE, model_kwargs=kw, noise=x_T, cfg_scale=0.0, null_label=5)
    uncond = sample(diffusion, model, SHAPE, model_kwargs={"y": torch.tensor([5, 5])}, noise=x_T)
    torch.testing.assert_close(w0, uncond, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="null_label"):
        sample(diffusion, model, SHAPE, model_kwargs=kw, cfg_scale=2.0)

    # One batched call of 2N; only the eps channels are guided, the cond variance is kept.
    calls = []

    def counting(x, t, y=None):
        calls.append(x.shape[0])
        return model(x, t, y)

    x, t = torch.randn(SHAPE), torch.tensor([3, 900])
    out = ClassifierFreeGuidance(counting, 3.0, 5)(x, t, **kw)
    c, u = model(x, t, kw["y"]), model(x, t, torch.tensor([5, 5]))
    assert calls == [4]
    torch.testing.assert_close(out[:, :3], u[:, :3] + 3.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(out[:, 3:], c[:, 3:])

    # Per-image conditioning (an upsampler's low_res) goes with both halves; anything else as given.
    def conditioned(x, t, y=None, low_res=None, note=None):
        assert note == "as given"
        return model(x + low_res, t, y)

    low = torch.randn(SHAPE)
    out = ClassifierFreeGuidance(conditioned, 3.0, 5)(x, t, low_res=low, note="as given", **kw)
    c, u = model(x + low, t, kw["y"]), model(x + low, t, torch.tensor([5, 5]))
    torch.testing.assert_close(out[:, :3], u[:, :3] + 3.0 * (c[:, :3] - u[:, :3]))


def test_unconditional_model_does_not_get_labels(setup):
    diffusion, _, classifier, kw = setup
    model = ToyModel(learn_sigma=True, num_classes=None).eval()
    out = sample(diffusion, model, SHAPE, model_kwargs=kw, classifier=classifier, classifier_scale=1.0)
    assert torch.isfinite(out).all()


def _gaussian_data_model(mu, s):
    """Exact eps for data ~ N(mu, s^2) (per element) under the 1000-step cosine process."""
    abar = torch.from_numpy(make_diffusion(steps=1000, noise_schedule="cosine").alphas_cumprod)

    def model(x, t):
        ab = abar[t].view(-1, 1, 1, 1)
        x0 = mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x - ab.sqrt() * mu)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return model


def _ode_error(sampler, steps, mu, s):
    diffusion = make_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing=str(steps))
    x_T = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=_gen(0))
    ab = diffusion.alphas_cumprod[-1]
    # The probability-flow ODE keeps the standardized coordinate of a Gaussian fixed.
    exact = mu + s * (x_T - ab**0.5 * mu) / (ab * s**2 + 1 - ab) ** 0.5
    out = sample(
        diffusion, _gaussian_data_model(mu, s), x_T.shape, sampler=sampler, noise=x_T, clip_denoised=False
    )
    return (out - exact).abs().max().item()


def test_dpm_solver_converges_to_point_and_is_second_order():
    mu = torch.linspace(-0.6, 0.6, 16, dtype=torch.float64).view(1, 1, 4, 4)
    for steps in (10, 20):
        assert _ode_error("dpm++2m", steps, mu, 0.0) < 1e-6
        assert _ode_error("dpm++2m", steps, mu, 0.01) < 0.02
    # On a Gaussian, 4x the steps cut the error ~16x (second order) vs ~4x for DDIM.
    dpm = _ode_error("dpm++2m", 100, mu, 0.5) / _ode_error("dpm++2m", 400, mu, 0.5)
    ddim = _ode_error("ddim", 100, mu, 0.5) / _ode_error("ddim", 400, mu, 0.5)
    assert dpm > 10 and ddim < 6
    assert _ode_error("dpm++2m", 400, mu, 0.5) < _ode_error("ddim", 400, mu, 0.5) / 5


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_nan_reports_first_bad_step(sampler):
    diffusion = make_diffusion(steps=1000, timestep_respacing="ddim10")

    def model(x, t):
        return torch.where((t == 500).view(-1, 1, 1, 1), torch.nan, 0.1 * x)

    seen = []
    with pytest.raises(SamplingError, match=r"sampling step 5/10 \(t=500\)"):
        for i, _, _ in sample_steps(diffusion, model, SHAPE, sampler=sampler, generator=_gen(0)):
            seen.append(i)
    assert seen == list(range(10))  # checked once, at the end


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_process_ending_at_alpha_bar_zero_says_so(sampler):
    """The linear schedule at 20 steps ends with beta 1: every eps model gives NaN at t=19, as in
    guided-diffusion (fuzz seed 1039); the error names the process, not the model."""
    diffusion = make_diffusion(steps=20, timestep_respacing="3,2")
    with pytest.raises(SamplingError, match=r"step 1/5 \(t=19\); the process's alpha_bar is 0 there"):
        sample(diffusion, lambda x, t: 0.1 * x, SHAPE, sampler=sampler, generator=_gen(0))
    skipped = make_diffusion(steps=20, timestep_respacing="ddim4")  # 0, 5, 10, 15: samples fine
    assert sample(skipped, lambda x, t: 0.1 * x, SHAPE, sampler=sampler, generator=_gen(0)).isfinite().all()
    with pytest.raises(SamplingError) as info:  # a model's own NaN keeps the plain message
        sample(skipped, lambda x, t: x * torch.nan, SHAPE, sampler=sampler, generator=_gen(0))
    assert "alpha_bar" not in str(info.value)


def test_float64_and_unknown_sampler(setup):
    diffusion, model, _, kw = setup
    model = model.double()
    out = sample(
        diffusion,
        model,
        SHAPE,
        sampler="dpm++2m",
        model_kwargs=kw,
        noise=torch.randn(SHAPE, dtype=torch.float64),
    )
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(diffusion, model, SHAPE, sampler="euler")


def test_compat_loops_progressive(setup):
    diffusion, model, _, kw = setup
    compat = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="ddim8"
    )
    x_T = torch.randn(SHAPE)
    outs = list(compat.ddim_sample_loop_progressive(model, SHAPE, noise=x_T, model_kwargs=kw))
    assert len(outs) == 8 and set(outs[0]) == {"sample", "pred_xstart"}
    assert torch.equal(outs[-1]["sample"], compat.ddim_sample_loop(model, SHAPE, noise=x_T, model_kwargs=kw))
    # The loops' values and random draws against the original: tests/test_variant_vectors.py.


def test_noise_fn_replays_generator_draw_order(setup):
    """x_T first, then one draw per step: replaying those draws reproduces a seeded run."""
    diffusion, model, _, kw = setup
    g = _gen(3)
    x_T = torch.randn(SHAPE, generator=g)
    recorded = [torch.randn(SHAPE, generator=g) for _ in range(diffusion.num_timesteps)]
    seeded = sample(diffusion, model, SHAPE, sampler="ddpm", model_kwargs=kw, generator=_gen(3))
    *_, (_, replayed, _) = sample_steps(
        diffusion, model, SHAPE, sampler="ddpm", model_kwargs=kw, noise=x_T, noise_fn=lambda i, x: recorded[i]
    )
    assert torch.equal(seeded, replayed)


def test_model_device_is_the_first_parameters_device_else_the_cpu():
    """One rule for where a model computes, shared by the samplers and fastdiff.Sampler (the
    Sampler had its own copy)."""
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert model_device(lambda x, t, **kw: x) == torch.device("cpu")  # a plain function
    assert model_device(nn.Identity()) == torch.device("cpu")


def test_check_shape_checks_an_image_shape_too():
    """Sampler's image_shape has no batch; it goes through the same check (it had a copy of it)."""
    from fastdiff.diffusion.samplers import check_shape

    assert check_shape([3, 8], batch=False) == (3, 8) and check_shape((2, 3, 8)) == (2, 3, 8)
    for bad in ((8,), (3, 0, 8), (3, True, 8)):
        with pytest.raises(ValueError, match=r"^image_shape must be positive ints \(C, H, W\), got "):
            check_shape(bad, batch=False)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_clip_order_around_classifier_guidance(sampler):
    """Guiding shifts x0 by (1 - abar) / sqrt(abar) * grad. DDIM clips x0 before that shift (the
    original's order); DPM-Solver++ clips the guided x0, as its authors do, and steps with it."""
    diffusion = make_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="4")
    x, eps, grad = (torch.randn(SHAPE, generator=_gen(k)) for k in range(3))
    rule = make_rule(diffusion, sampler)
    t = torch.full((SHAPE[0],), 2)  # a step of second order for dpm++2m: x0_prev matters too
    step = SamplingStep(diffusion, lambda x, t: eps, rule, cond_fn=lambda x, t: grad)
    x0_prev = torch.randn(SHAPE, generator=_gen(3))
    x_next, x0, _ = step(x, t, None, x0_prev)
    abar = diffusion.alphas_cumprod[2]
    raw = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    shift = (1 - abar) / abar**0.5 * grad
    expected = (raw + shift).clamp(-1, 1) if sampler == "dpm++2m" else raw.clamp(-1, 1) + shift
    torch.testing.assert_close(x0, expected)
    assert (x0.abs() > 1).any() == (sampler == "ddim")
    if sampler == "dpm++2m":
        torch.testing.assert_close(x_next, rule(dict(pred_xstart=expected), x, t, None, x0_prev)[0])


@pytest.mark.parametrize("times", [3, 10, 11, 20])
def test_dpm_solver_takes_its_last_step_first_order_under_10_steps(times):
    """The DPM-Solver authors' lower_order_final: under 10 solver steps (times - 1) the step into
    t = 0 is first order, DDIM's step on the same x0 (it was second order at every count); at
    10 steps and more it keeps the previous x0's correction. Inner steps are second order."""
    diffusion = make_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing=str(times))
    dpm = make_rule(diffusion, "dpm++2m", dtype=torch.float64)
    x, x0, prev, other = (torch.randn(SHAPE, dtype=torch.float64, generator=_gen(k)) for k in range(4))
    for k in (1, 2) if times > 3 else (1,):
        t = torch.full((SHAPE[0],), k)
        moved = not torch.equal(
            dpm(dict(pred_xstart=x0), x, t, None, prev)[0], dpm(dict(pred_xstart=x0), x, t, None, other)[0]
        )
        assert moved == (k == 2 or times - 1 >= 10), (k, times)
    t = torch.ones(SHAPE[0], dtype=torch.long)
    if times - 1 < 10:  # DDIM's deterministic step, in float64 (DDIM's own tables are float32)
        abar, abar_next = diffusion.alphas_cumprod[1], diffusion.alphas_cumprod[0]
        eps = (x - abar**0.5 * x0) / (1 - abar) ** 0.5
        want = abar_next**0.5 * x0 + (1 - abar_next) ** 0.5 * eps
        torch.testing.assert_close(dpm(dict(pred_xstart=x0), x, t, None, prev)[0], want)
