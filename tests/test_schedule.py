"""Beta schedules and respacing match guided-diffusion's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import make_diffusion

from fastdiff.diffusion import get_named_beta_schedule, space_timesteps
from fastdiff.diffusion.schedule import respace_betas


def test_linear_schedule_endpoints_and_scale():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-15) and betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    # Scaled by 1000 / T so any length spans the same total noise.
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_values_and_clip():
    T = 1000
    betas = get_named_beta_schedule("cosine", T)

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 1, 500, 998):
        assert betas[i] == 1 - f((i + 1) / T) / f(i / T)
    assert betas[-1] == 0.999  # clipped: alpha_bar(1) is ~0
    assert betas.max() <= 0.999 and (betas > 0).all()
    # alpha_bar follows the continuous curve (up to the clip at the very end).
    np.testing.assert_allclose(
        np.cumprod(1 - betas)[:-1], [f((i + 1) / T) / f(0) for i in range(T - 1)], rtol=1e-9
    )


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_respacing_matches_reference_table(respacing_table):
    assert respacing_table
    for spec, steps in respacing_table.items():
        assert space_timesteps(1000, spec) == steps, spec


def test_respacing_sections_and_errors():
    assert space_timesteps(300, [10, 15, 20])[:3] == [0, 11, 22]
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(100, "1") == [0]
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    for spec in ("ddim7x", "7,x", "ddim", ""):  # a typo says what the spec looks like
        with pytest.raises(ValueError, match="expected 'ddimN' or comma-separated step counts"):
            space_timesteps(100, spec)


def test_from_config_names_a_bad_respacing():
    """GaussianDiffusion.from_config's respacing: one ValueError naming it (25 was "'int' object
    is not iterable", "0" a complaint about the betas' shape); None and "" keep every step."""
    for respacing, message in (
        (25, "respacing must be a string such as 'ddim25' or '250', or a list of step counts, got int 25"),
        ("0", "respacing '0' of a 100-step process: keeps 0 step\\(s\\); a process needs 2"),
        ("ddim1", "respacing 'ddim1' of a 100-step process: cannot create exactly 1 steps"),
    ):
        with pytest.raises(ValueError, match=message):
            make_diffusion(steps=100, timestep_respacing=respacing)
    assert make_diffusion(steps=100, timestep_respacing=None).num_timesteps == 100


def test_respaced_process_keeps_alpha_bar():
    base = make_diffusion(steps=1000, noise_schedule="cosine")
    spaced = make_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim25")
    assert spaced.num_timesteps == 25
    assert list(spaced.timestep_map) == space_timesteps(1000, "ddim25")
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    betas, kept = respace_betas(np.cumprod(1 - get_named_beta_schedule("linear", 10)), [0, 5, 9])
    assert list(kept) == [0, 5, 9] and betas.shape == (3,)


def test_model_timesteps_are_original_and_rescaled():
    spaced = make_diffusion(steps=4000, timestep_respacing="ddim10")
    t = torch.tensor([0, 1, 9])
    assert spaced.model_timesteps(t).tolist() == [0, 400, 3600]
    rescaled = make_diffusion(steps=4000, timestep_respacing="ddim10", rescale_timesteps=True)
    out = rescaled.model_timesteps(t)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 100.0, 900.0]
