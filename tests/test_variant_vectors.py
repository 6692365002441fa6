"""Every architecture and process option against guided-diffusion (tests/vectors/variants.pt).

The recipe of calls is ``tests/vectors/variants.py``; guided-diffusion ran it to make the file, and
here fastdiff's compat layer runs the same calls from the same flags and seeded weights. Each
variant runs on the product's CPU path (``auto``) and on the plain PyTorch references.
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
TOLERANCE = {"out": 1e-5, "logits": 1e-5, "grad": 1e-4, "losses": 1e-5, "ddpm": 1e-4, "ddim": 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_the_file_covers_every_variant():
    assert set(CASES) == set(VARIANTS)


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_matches_the_original(name, mode, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    case = CASES[name]
    got = run_variant(gd, torch, case["kind"], case["flags"])
    assert set(got) == set(case["outputs"])
    for key, want in case["outputs"].items():
        if isinstance(want, dict):  # training losses, per term
            assert set(got[key]) == set(want), key
            for term, w in want.items():
                assert rel_err(got[key][term], w) <= TOLERANCE[key], f"{key}/{term}"
        else:
            assert got[key].shape == want.shape, key
            assert rel_err(got[key], want) <= TOLERANCE[key], key
