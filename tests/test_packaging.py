"""A non-editable install carries every file the code opens at runtime (CI installs editable,
where a file missing from the wheel goes unnoticed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastdiff

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fastdiff"
if Path(fastdiff.__file__).parent != PACKAGE:
    pytest.skip(
        "checks this checkout's packaging; fastdiff is imported from elsewhere", allow_module_level=True
    )


def runtime_files() -> set[Path]:
    """The files the package reads beside its modules: the bundled networks."""
    from fastdiff.evaluation.networks import BUNDLED_CNN
    from fastdiff.runs.loading import BUNDLED_CLASSIFIER, BUNDLED_MODEL

    return {BUNDLED_CNN, BUNDLED_MODEL, BUNDLED_CLASSIFIER}


def kernel_sources() -> dict[str, str]:
    """The CUDA sources the extension JIT-builds: where each sits in an sdist (the checkout's
    csrc/) -> where a wheel carries it (setup.py copies it into the package)."""
    from fastdiff.ops._cuda_build import FILES

    return {f"csrc/{f}": f"fastdiff/csrc/{f}" for f in FILES}


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader, which it needs there
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def package_data() -> set[Path]:
    """The files pyproject's package-data puts into the wheel."""
    patterns = pyproject()["tool"]["setuptools"]["package-data"]
    return {p for pattern in patterns["fastdiff"] for p in PACKAGE.glob(pattern) if p.is_file()}


def test_package_data_covers_every_runtime_file():
    files = runtime_files()
    assert all(f.is_file() and f.is_relative_to(PACKAGE) for f in files), files
    assert files <= package_data()


def test_package_data_covers_every_non_python_file_in_the_package():
    """A data file added under fastdiff/ later is shipped too (or this names it)."""
    tracked = subprocess.run(
        ["git", "ls-files", "fastdiff"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    data = {REPO / f for f in tracked if not f.endswith(".py")}
    assert data, "git ls-files found nothing"
    assert data - package_data() == set()


def test_the_built_wheel_and_sdist_hold_the_runtime_files(tmp_path):
    """Built for real from a copy of the tracked files (a few seconds), as pip builds them."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in tracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((REPO / f).read_bytes())
    out = tmp_path / "dist"
    out.mkdir()
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between them
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])",
                str(out),
            ],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Deprecat" not in r.stderr, r.stderr[-3000:]  # a deprecated setting breaks a later setuptools
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    wanted = {str(f.relative_to(REPO)) for f in runtime_files()} | {"fastdiff/py.typed"}
    with zipfile.ZipFile(wheel) as z:
        members = set(z.namelist())
        metadata = z.read(f"fastdiff-{fastdiff.__version__}.dist-info/METADATA").decode()
    assert wanted | set(kernel_sources().values()) <= members
    assert f"Version: {fastdiff.__version__}\n" in metadata and "License-Expression: MIT\n" in metadata
    assert f"fastdiff-{fastdiff.__version__}.dist-info/licenses/LICENSE" in members  # MIT wants its notice
    assert not [m for m in members if m.startswith(("tests/", "bench/", "docs/"))]
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(root + "/") for n in tar.getnames()}
    assert wanted | set(kernel_sources()) | {"LICENSE"} <= names
    assert not [n for n in names if n.startswith("tests/")]


def test_building_the_cuda_extension_on_a_cpu_torch_is_one_line():
    """FASTDIFF_BUILD_CUDA=1 with a CPU-only torch (nvcc may well be there): a line saying so, not
    torch's CUDA_HOME traceback from inside pip's metadata step."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("needs a CPU-only torch")
    env = {**os.environ, "FASTDIFF_BUILD_CUDA": "1"}
    r = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode != 0
    assert r.stderr.strip() == (
        f"FASTDIFF_BUILD_CUDA=1 needs a CUDA build of torch (torch {torch.__version__} is CPU-only)"
    )


def test_a_checkout_builds_the_kernels_from_its_csrc():
    """The sources sit beside the package here; a wheel carries them inside it (checked above)."""
    from fastdiff.ops._cuda_build import csrc_dir

    assert csrc_dir() == REPO / "csrc"


def test_dev_extra_carries_the_build_requirements():
    """The build test above runs setuptools from the test environment, not an isolated build: a
    new venv's setuptools 65 failed it (and setup.py --name) on the SPDX license string."""
    config = pyproject()
    dev = config["project"]["optional-dependencies"]["dev"]
    assert set(config["build-system"]["requires"]) <= set(dev)
