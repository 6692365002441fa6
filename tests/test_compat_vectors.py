"""Acceptance: the compat layer reproduces guided-diffusion's reference vectors.

Each case (../shared/vectors/*.pt) is built from its own flags through
``fastdiff.compat.guided_diffusion``; everything is branched on the keys a case has (class
conditioning, classifier, sampling method, recorded noise), not on this repository's cases.

Every test runs once per ops mode: ``reference`` (plain PyTorch everywhere), ``auto`` (what the
product runs: the kernels on CUDA, PyTorch's fastest exact paths on the CPU) and ``triton`` (the
Triton kernels; on the CPU that is the interpreter, ~3 minutes per ImageNet-64 forward, so it
runs there only with FASTDIFF_KERNEL_VECTORS=1).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from builders import rel_err
from conftest import load_case
from vectors.variants import process_flags

from fastdiff.compat import guided_diffusion as gd
from fastdiff.diffusion import sample
from fastdiff.diffusion.samplers import sample_steps


@pytest.fixture(autouse=True, params=["reference", "auto", "triton"])
def ops_mode(request, monkeypatch):
    mode = request.param
    if mode == "triton":
        from fastdiff.ops._backend import triton_available, triton_interpret

        if not triton_available():
            pytest.skip("triton is not installed")
        if not torch.cuda.is_available():
            if not triton_interpret():
                pytest.skip("no CUDA, and TRITON_INTERPRET=1 is not set")
            if os.environ.get("FASTDIFF_KERNEL_VECTORS", "0") in ("", "0"):
                pytest.skip("interpreted kernels take minutes per case: set FASTDIFF_KERNEL_VECTORS=1")
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    return mode


@functools.lru_cache(maxsize=2)
def _built(path: Path):
    """(case, model, diffusion, classifier or None), built once per case."""
    case = load_case(path)
    if case.get("kind") == "superres":
        model, diffusion = gd.sr_create_model_and_diffusion(**case["flags"])
    else:
        model, diffusion = gd.create_model_and_diffusion(**case["flags"])
    model.load_state_dict(case["state_dict"], strict=True)
    model.eval()
    classifier = None
    if "classifier" in case:
        classifier = gd.create_classifier(**case["classifier"]["flags"])
        classifier.load_state_dict(case["classifier"]["state_dict"], strict=True)
        classifier.eval()
    return case, model, diffusion, classifier


def _model_kwargs(case, part):
    """What the network itself takes: labels if class-conditional, low_res for an upsampler."""
    kwargs = {}
    y = part.get("y", case.get("y"))
    if y is not None and case["flags"].get("class_cond", False):
        kwargs["y"] = y
    low_res = part.get("low_res", case.get("low_res"))
    if low_res is not None:
        kwargs["low_res"] = low_res
    return kwargs


def _sample_kwargs(spec):
    """model_kwargs of a sampling loop: labels (for guidance too) and low_res if present."""
    return {k: spec[k] for k in ("y", "low_res") if spec.get(k) is not None}


def test_forward(case_path):
    case, model, _, _ = _built(case_path)
    with torch.no_grad():
        out = model(case["x"], case["t"], **_model_kwargs(case, case))
    assert rel_err(out, case["out"]) <= 1e-5


def test_classifier_logits(case_path):
    case, _, _, classifier = _built(case_path)
    if classifier is None:
        pytest.skip("case has no classifier")
    ref = case["classifier"]
    with torch.no_grad():
        assert rel_err(classifier(ref["x"], ref["t"]), ref["out"]) <= 1e-5


def test_training_losses(case_path):
    case, model, diffusion, _ = _built(case_path)
    train = case["train"]
    with torch.no_grad():
        terms = diffusion.training_losses(
            model, train["x_start"], train["t"], model_kwargs=_model_kwargs(case, train), noise=train["noise"]
        )
    expected = {k for k in ("mse", "vb", "loss") if k in train}
    assert expected <= set(terms)
    for key in expected:
        assert rel_err(terms[key], train[key]) <= 1e-5, key


def _sampling_setup(case_path):
    case, model, _, classifier = _built(case_path)
    spec = case["sample"]
    method = spec.get("method", "ddim")
    if method not in ("ddim", "ddpm"):
        pytest.fail(f"unknown sampling method {method!r} in case")
    # The respaced process from the case's own diffusion flags, as script_util builds it.
    diffusion = gd.create_gaussian_diffusion(
        steps=case["flags"].get("diffusion_steps", 1000),
        timestep_respacing=spec["respacing"],
        **process_flags(gd, {**gd.diffusion_defaults(), **case["flags"]}),
    )
    assert list(diffusion.timestep_map) == list(spec["use_timesteps"])
    scale = float(spec.get("classifier_scale", 0.0))
    if scale != 0:
        assert classifier is not None, "a guided case needs its classifier"
    return case, spec, method, model, diffusion, classifier, scale


def _stochastic(spec, method) -> bool:
    return method == "ddpm" or float(spec.get("eta", 0.0)) != 0


def _check_trajectory(xs, spec):
    trajectory = spec["trajectory"]
    assert len(xs) == len(trajectory)
    for i, x in enumerate(xs):
        assert rel_err(x, trajectory[i]) <= 1e-4, f"step {i}"
    assert rel_err(xs[-1], spec["x_0"]) <= 1e-4


def test_guided_sampling_compat(case_path):
    """The trajectory through guided-diffusion's own API: cond_fn as in classifier_sample.py."""
    case, spec, method, model, diffusion, classifier, scale = _sampling_setup(case_path)
    class_cond = case["flags"].get("class_cond", False)

    def model_fn(x, t, y=None, **kw):
        return model(x, t, y=y if class_cond else None, **kw)

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    kwargs = dict(
        noise=spec["x_T"],
        clip_denoised=spec.get("clip_denoised", True),
        cond_fn=cond_fn if scale != 0 else None,
        model_kwargs=_sample_kwargs(spec),
    )
    shape = tuple(spec["x_T"].shape)
    eta = float(spec.get("eta", 0.0))
    if _stochastic(spec, method) and "noise" in spec:
        # The loop p_sample_loop / ddim_sample_loop run, replaying the recorded per-step noise
        # (``noise[i]``: the noise drawn at step i).
        recorded = spec["noise"]
        steps = sample_steps(
            diffusion,
            model_fn,
            shape,
            sampler=method,
            eta=eta,
            noise_fn=lambda i, x: recorded[i].to(x),
            **kwargs,
        )
        xs = [x for _, x, _ in steps]
    else:
        if _stochastic(spec, method):
            if "seed" not in spec:
                pytest.skip("stochastic case without recorded noise or seed cannot be replayed")
            torch.manual_seed(int(spec["seed"]))  # then drawn exactly as guided-diffusion draws
        if method == "ddim":
            steps = diffusion.ddim_sample_loop_progressive(model_fn, shape, eta=eta, **kwargs)
        else:
            steps = diffusion.p_sample_loop_progressive(model_fn, shape, **kwargs)
        xs = [out["sample"] for out in steps]
    _check_trajectory(xs, spec)


def test_guided_sampling_fastdiff(case_path):
    """The same trajectory through fastdiff.diffusion.sample and its callback."""
    case, spec, method, model, diffusion, classifier, scale = _sampling_setup(case_path)
    if _stochastic(spec, method):
        if "seed" not in spec:
            pytest.skip("sample() draws its own noise; the recorded-noise replay is tested via compat")
        torch.manual_seed(int(spec["seed"]))
    xs = []
    sample(
        diffusion,
        model,
        tuple(spec["x_T"].shape),
        sampler=method,
        eta=spec.get("eta", 0.0),
        model_kwargs=_sample_kwargs(spec),
        classifier=classifier if scale != 0 else None,
        classifier_scale=scale,
        clip_denoised=spec.get("clip_denoised", True),
        noise=spec["x_T"],
        callback=lambda i, x, pred_xstart: xs.append(x),
    )
    _check_trajectory(xs, spec)


def test_defaults_and_flag_errors():
    """script_util's defaults and its strictness about unknown names (no vectors needed)."""
    assert {"image_size", "num_channels", "learn_sigma", "diffusion_steps", "timestep_respacing"} <= set(
        gd.model_and_diffusion_defaults()
    )
    sr = gd.sr_model_and_diffusion_defaults()
    assert {"large_size", "small_size", "diffusion_steps"} <= set(sr) and "image_size" not in sr
    assert gd.classifier_defaults()["classifier_pool"] == "attention"
    with pytest.raises(TypeError, match="num_chanels"):
        gd.create_model_and_diffusion(num_chanels=32)
    diffusion = gd.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim25")
    assert isinstance(diffusion, gd.SpacedDiffusion) and diffusion.num_timesteps == 25
    assert diffusion.model_var_type == "learned_range"
