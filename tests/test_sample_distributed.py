"""`fastdiff sample` under torchrun (gloo, 2 CPU processes) on the bundled MNIST model: the same
files as one process, a rank killed mid-run, and resumes with 2 ranks or 1 process."""

from __future__ import annotations

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
from click.testing import CliRunner

from fastdiff.cli.main import main

REPO = Path(__file__).resolve().parents[1]
# 8 batches of 2 at 4 steps: about half a second a batch per rank here, so a kill after the first
# batch lands while each rank still has batches to go.
ARGS = ["--steps", "4", "--num-samples", "16", "--batch-size", "2", "--seed", "5", "--no-progress"]
NPZ = "samples_16x32x32x1.npz"

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds ranks through /proc")


def one_process(out: Path, *extra: str):
    return CliRunner().invoke(main, ["sample", *ARGS, "--out", str(out), *extra])


def torchrun(out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "fastdiff.cli.main", "sample", *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=120)
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
    assert pngs == sorted(p.name for p in (b / "images").iterdir()) and len(pngs) == 16
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


def test_two_ranks_write_what_one_process_writes(reference, tmp_path):
    rc, output = torchrun(tmp_path / "run")
    assert rc == 0, output[-3000:]
    assert "16 images (0 already there)" in output and "x 2 ranks" in output
    assert output.count("images/s") == 1  # one summary, from rank 0
    assert_same_run(reference, tmp_path / "run")
    # a record mismatch still refuses to mix runs, on every rank, in one line each
    rc, output = torchrun(tmp_path / "run", "--resume", "--seed", "6")
    assert rc != 0
    assert output.count("Error: --resume: this run differs from the one in") == 2, output[-3000:]
    assert "fastdiff/cli" not in output  # no traceback of ours


def test_killed_rank_resumes_with_two_ranks_or_one_process(reference, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(out, wait=False)
    deadline = time.monotonic() + 90
    while not list((out / "batches").glob("batch_*.npz")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no batch written"
        time.sleep(0.01)
    victim = rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output[-3000:]  # torchrun reports the killed rank
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]
    written = list((out / "batches").glob("batch_*.npz"))
    assert 0 < len(written) < 8 and not (out / NPZ).exists(), "the kill came too late to test a resume"

    again = tmp_path / "copy"
    shutil.copytree(out, again)
    rc, output = torchrun(out, "--resume")
    assert rc == 0, output[-3000:]
    assert f"({2 * len(written)} already there)" in output
    assert_same_run(reference, out)

    r = one_process(again, "--resume")  # a 2-rank run finished by one process
    assert r.exit_code == 0, r.output
    assert_same_run(reference, again)
