"""Every architecture and process option against guided-diffusion (tests/vectors/variants.pt).

The recipe of calls is ``tests/vectors/variants.py``; guided-diffusion ran it to make the file, and
here fastdiff's compat layer runs the same calls from the same flags and seeded weights. Each
variant runs on the product's CPU path (``auto``) and, in the slow stage, on the plain PyTorch
references.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS_FILE, load_case
from vectors.variants import VARIANTS, run_variant

from fastdiff.compat import guided_diffusion as gd

CASES = load_case(VARIANTS_FILE)["cases"]

# float32 rounding of one forward pass; a gradient or a 4-5 step loop compounds it. Measured worst
# cases (both modes): forward 7.5e-7, logits 2.7e-7, losses 1.2e-7, input gradient 1.3e-6,
# DDPM 1.2e-6, DDIM 6.6e-6: every margin is 13x or more.
TOLERANCE = {
    "out": 1e-5,
    "logits": 1e-5,
    "grad": 1e-4,
    "losses": 1e-5,
    "bpd": 1e-5,
    "ddim_reverse": 1e-5,
    "ddpm": 1e-4,
    "ddim": 1e-4,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _pairs(got: dict, want: dict):
    """(name, got, want) per tensor, training-loss and bpd terms one by one."""
    assert set(got) == set(want)
    for key, w in want.items():
        if isinstance(w, dict):
            assert set(got[key]) == set(w), key
            yield from ((key, f"{key}/{term}", got[key][term], w[term]) for term in w)
        else:
            assert got[key].shape == w.shape, key
            yield key, key, got[key], w


def test_the_file_covers_every_variant():
    assert set(CASES) == set(VARIANTS)


# The product's path in the default suite; the references (a second run of every variant) in the
# slow stage, which CI also runs.
@pytest.mark.parametrize("mode", ["auto", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_matches_the_original(name, mode, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    case = CASES[name]
    got = run_variant(gd, torch, case["kind"], case["flags"])
    # An fp16 variant: within twice the original's own fp16 error (against its fp32 outputs) of
    # the original's values, and of the fp32 values (as accurate as the original, give or take 2x).
    own, fp32 = {}, {}
    if "fp32_outputs" in case:
        for _, what, w, w32 in _pairs(case["outputs"], case["fp32_outputs"]):
            own[what], fp32[what] = 2 * rel_err(w, w32), w32
    for key, what, g, w in _pairs(got, case["outputs"]):
        assert rel_err(g, w) <= max(TOLERANCE[key], own.get(what, 0.0)), what
        if what in fp32:
            assert rel_err(g, fp32[what]) <= own[what], f"{what} against fp32"
