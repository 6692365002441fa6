"""The README's Python examples run as written (in a fresh process, in an empty folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.slow  # the sampling examples make 64 images on the CPU: about a minute
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_bundled_model_is_as_the_readme_says():
    """The quick start's and the bundled-model section's facts: the default classifier scale, the
    size, and the files `fastdiff sample` writes by default (16 samples of 32x32x1)."""
    import inspect

    import fastdiff
    from fastdiff.runs import load_diffusion_model
    from fastdiff.runs.writer import final_npz_name

    readme = (REPO / "README.md").read_text()
    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device="cpu")
    scale = loaded.default_classifier_scale
    assert f"`--classifier-scale` (default {scale:g})" in readme and f"uses s={scale:g} by default" in readme
    millions = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    assert f"({millions:.1f}M parameters" in readme
    default_n = inspect.signature(fastdiff.sample_run).parameters["num_samples"].default
    npz = final_npz_name(default_n, (loaded.image_size, loaded.image_size, loaded.in_channels))
    assert f"`samples/{npz}`" in readme
