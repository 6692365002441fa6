"""fastdiff.runs from Python: a run without the CLI writes what `fastdiff sample` writes, and a
user error is the library's RunError, not click's."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import fastdiff
from fastdiff.cli.main import main
from fastdiff.runs import RunError

TINY = dict(num_samples=3, batch_size=2, steps=2, classes="3,7", device="cpu", threads=1)

RUN = """
import sys
import fastdiff

summary = fastdiff.sample_run(sys.argv[1], num_samples=3, batch_size=2, steps=2, classes="3,7",
                              device="cpu", threads=1)
assert summary["images"] == 3, summary
assert "fastdiff.cli" not in sys.modules, "a library run imported the CLI"
assert "click" not in sys.modules, "a library run imported click"
"""


def test_a_run_from_python_needs_no_cli_and_writes_what_the_cli_writes(tmp_path):
    subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "lib")], check=True, timeout=600)
    args = ["sample", "--no-progress", "--num-samples", "3", "--batch-size", "2", "--steps", "2"]
    args += ["--classes", "3,7", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "cli")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for name in ("run.json", "samples_3x32x32x1.npz", "grid.png", "batches/batch_00001.npz"):
        assert (tmp_path / "lib" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_import_is_cheap():
    code = "import sys, fastdiff, fastdiff.runs\nfastdiff.RunError\nassert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_user_error_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="--steps must be between 2 and") as e:
        fastdiff.sample_run(tmp_path / "a", **{**TINY, "steps": 1})
    assert not isinstance(e.value, click.ClickException)
    assert not (tmp_path / "a").exists()  # refused before the folder was made


def test_a_folder_holding_a_run_needs_resume_and_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    assert fastdiff.sample_run(out, **TINY)["images"] == 3
    with pytest.raises(RunError, match="already holds a sampling run"):
        fastdiff.sample_run(out, **TINY)
    with pytest.raises(RunError, match="differs from the one in .* in: seed"):
        fastdiff.sample_run(out, **{**TINY, "seed": 1}, resume=True)
    summary = fastdiff.sample_run(out, **{**TINY, "num_samples": 4}, resume=True)
    assert (summary["images"], summary["skipped"]) == (2, 2)  # the partial last batch is made again
    assert (out / "samples_4x32x32x1.npz").is_file() and not (out / "samples_3x32x32x1.npz").exists()


def test_an_upsampling_user_error_is_a_run_error(tmp_path):
    from fastdiff.runs import upsample_file_run

    with pytest.raises(RunError, match="--low-res not found"):
        upsample_file_run(tmp_path / "missing.npz", tmp_path / "up", checkpoint=None, device="cpu")
