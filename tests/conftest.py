"""Shared fixtures: the guided-diffusion reference vectors in ../shared/vectors, and the runs
invert's and interpolate's tests share (their imports inside them: every test session loads
this file, most need neither the CLI nor a network)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

# One thread per test process (and for the CLIs tests start): torch's default of every core made the
# suite 4x slower on a shared 2-core machine. FASTDIFF_TEST_THREADS overrides.
_THREADS = os.environ.get("FASTDIFF_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = _THREADS
torch.set_num_threads(int(_THREADS))

# The Ctrl-C tests (CLIs they start, training in this process) need SIGINT's default handling:
# a runner started with SIGINT ignored, as a script's background job (`cmd &`, nohup) is, passed
# that on to every process here, and each rightly ignored Ctrl-C (exit 0 for 130, a 60 s hang).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
VECTORS = Path(os.environ.get("FASTDIFF_VECTORS", REPO.parent / "shared" / "vectors"))


# Tiny cases made with tests/vectors/make_vectors.py from the original code, committed so a fresh
# clone checks fidelity even without ../shared/vectors.
BUNDLED_VECTORS = REPO / "tests" / "vectors"
# The architecture/process options at tiny sizes, without weights (tests/test_variant_vectors.py).
VARIANTS_FILE = BUNDLED_VECTORS / "variants.pt"


def vector_cases() -> list[Path]:
    shared = sorted(VECTORS.glob("*.pt")) if VECTORS.is_dir() else []
    return [p for p in sorted(BUNDLED_VECTORS.glob("*.pt")) if p != VARIANTS_FILE] + shared


def load_case(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(
            f"reference vectors not found at {VECTORS} (set FASTDIFF_VECTORS or clone beside ../shared)"
        )
    return VECTORS


@pytest.fixture(scope="session")
def respacing_table(vectors_dir) -> dict:
    import json

    return json.loads((vectors_dir / "respacing.json").read_text())


def pytest_generate_tests(metafunc):
    """Parametrize any test taking ``case_path`` over every vector case (one skip if none)."""
    if "case_path" in metafunc.fixturenames:
        cases = vector_cases()
        if not cases and os.environ.get("CI"):
            raise pytest.UsageError("CI: no reference vector cases found; the fidelity tests would not run")
        if cases:
            metafunc.parametrize("case_path", cases, ids=[p.stem for p in cases])
        else:
            metafunc.parametrize(
                "case_path",
                [pytest.param(None, marks=pytest.mark.skip(reason=f"no reference vectors at {VECTORS}"))],
            )


@pytest.fixture
def unlistable(monkeypatch):
    """``unlistable(folder)``: ``folder`` as its user sees a folder of mode 000, one it may not list.
    Root (CI runs as root) lists any folder whatever its mode, so for root os.scandir refuses it
    as the OS refuses the user."""
    denied: list[Path] = []
    scandir = os.scandir

    def refusing(path="."):
        if isinstance(path, str | os.PathLike) and Path(os.path.abspath(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    def deny(folder: Path) -> None:
        folder.chmod(0)
        denied.append(Path(os.path.abspath(folder)))
        if os.geteuid() == 0:
            monkeypatch.setattr(os, "scandir", refusing)

    yield deny
    for folder in denied:
        folder.chmod(0o755)  # for the tmp_path clean-up


@pytest.fixture(scope="module")
def inverted(tmp_path_factory):
    """Two bundled-model samples (classes 3 and 7), inverted and regenerated, and edited to a 5."""
    from builders import cli

    d = tmp_path_factory.mktemp("invert")
    args = ["sample", "--no-progress", "--num-samples", 2, "--classes", "3,7", "--steps", 10]
    r = cli(*args, "--classifier-scale", 0, "--out", d / "samples")
    assert r.exit_code == 0, r.output
    images = sorted((d / "samples" / "images").iterdir())  # their names carry their classes
    r = cli("invert", *images, "--steps", 10, "--to-class", 5, "--out", d / "inv")
    assert r.exit_code == 0, r.output
    return d, images, r.output


@pytest.fixture
def named_model(tmp_path):
    """A tiny class-conditional model whose weights name their classes cat and dog."""
    from builders import build_unet

    from fastdiff.models.checkpoint import save_weights

    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                 in_channels=1, class_cond=True, num_classes=2, diffusion_steps=100)  # fmt: skip
    path = tmp_path / "named.safetensors"
    metadata = {"flags": flags, "class_names": ["cat", "dog"]}
    save_weights(build_unet(**flags), path, metadata)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tf32_policy() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def no_tf32():
    """fp32 as fp32 on CUDA, whose convs default to TF32 (a 10-bit mantissa: fp16's error, which
    an fp32 tolerance is not for); the process's policy is restored afterwards."""
    before = _tf32_policy()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(autouse=True)
def _tf32_unchanged():
    """A test that leaves the TF32 policy changed fails: it held for every later test in the
    process (the nccl test's in-process samples against a fresh process's, byte for byte)."""
    before = _tf32_policy()
    yield
    assert _tf32_policy() == before, "the test changed the TF32 policy: use the no_tf32 fixture"


@pytest.fixture(autouse=True)
def _subprocess_tmpdir(monkeypatch, tmp_path_factory):
    """The processes a test starts keep their temporary files in a folder of the test's own:
    every torchrun left a $TMPDIR/torchelastic_* log folder (21 a run of the suite), and a killed
    process its multiprocessing pymp-* folder. This process' tempfile has chosen its folder, and a
    child it forks (a DataLoader worker) inherits that one: a test ends the workers it starts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """The tests (and what they start) keep fastdiff's cache (ONNX exports, kernel choices) in the
    session's temp folder, not the user's ~/.cache/fastdiff, where a graph exported by an earlier
    run, of other code, was this run's cache hit. For the session: a module's fixture that exports
    into a cache of its own sets FASTDIFF_CACHE for the tests that then find its graph there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _fresh_compat_logger(monkeypatch, tmp_path_factory):
    """guided-diffusion's logger is process-global and may hold a test's captured stdout: each test
    starts from an unconfigured one (as a fresh script does). Its default folder is the test's own:
    unset, a test that logs without configuring left a $TMPDIR/openai-<date-time> behind."""
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path_factory.mktemp("openai_logdir")))
    yield
    logger = sys.modules.get("fastdiff.compat.logger")
    if logger is not None:
        logger.Logger.CURRENT = logger.Logger.DEFAULT = None


def gpu_run_order(item) -> int:
    """Where a GPU test runs in the suite (``pytest -m gpu`` under bench/run_gpu.py's time limit,
    which cuts what is left): the CUDA-graph captures (the engines no CPU test can run) first,
    the torch.compile cold compiles (minutes each) last, every other test between, in file order."""
    if item.get_closest_marker("gpu") is None:
        return 1
    name = item.name.lower()
    if "compile" in name:
        return 2
    return 0 if "graph" in name or "capture" in name else 1


def pytest_collection_modifyitems(config, items):
    items[:] = sorted(items, key=gpu_run_order)  # stable: file order within each group
