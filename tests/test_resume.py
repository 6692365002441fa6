"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdiff.training import DiffusionTrainer
from tests.test_training import tiny_config, tiny_data

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "--num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
    "--num_head_channels 16 "
    "--learn_sigma True --class_cond True --diffusion_steps 50 --dropout 0.1"
)
STEPS = 24


def _cmd(npz, out, *extra):
    return [
        sys.executable, "-c", "from fastdiff.cli.train import train; train()",
        "--data", npz, "--flags", TINY, "--batch-size", "4", "--microbatch", "2", "--max-steps", str(STEPS),
        "--save-every", "3", "--log-every", "2", "--ema", "0.99,0.9", "--cfg-dropout", "--random-flip",
        "--schedule-sampler", "loss-second-moment", "--warmup-steps", "5", "--seed", "7", "--device", "cpu",
        "--out", str(out), *extra,
    ]  # fmt: skip


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _weights(out):
    latest = json.loads((out / "latest.json").read_text())
    assert latest["step"] == STEPS
    files = [latest["model"], *latest["ema"].values()]
    return [load_file(out / f) for f in files]


@pytest.mark.slow  # three training processes: CI's slow stage runs it
def test_kill9_and_resume_matches_uninterrupted(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8), np.arange(10) % 3)
    npz = str(tmp_path / "d.npz")

    full = subprocess.run(
        _cmd(npz, tmp_path / "full"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(npz, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "latest.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((out / "latest.json").read_text())["step"]
    assert killed_at < STEPS

    resumed = subprocess.run(
        _cmd(npz, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for a, b in zip(_weights(tmp_path / "full"), _weights(out)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    steps = [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(2, STEPS + 1, 2))  # rows past the checkpoint were dropped, then redone


class _Killed(Exception):
    pass


def _kill_after_save_at(monkeypatch, step):
    """Make the trainer die right after writing the checkpoint of ``step`` (a SIGKILL there)."""
    save = DiffusionTrainer.save

    def save_then_die(self):
        save(self)
        if self.step == step:
            raise _Killed

    monkeypatch.setattr(DiffusionTrainer, "save", save_then_die)


def test_resume_between_log_rows_and_after_a_checkpoint_repeats_the_log_and_grids(tmp_path, monkeypatch):
    """A checkpoint between two log rows keeps the running means, and a kill right after the
    checkpoint of a grid step still leaves that step's grid: log.jsonl and samples/ as unkilled."""
    ds = tiny_data()
    kw = {"max_steps": 6, "save_every": 4, "log_every": 3, "sample_every": 4, "sample_steps": 2}
    kw.update(num_samples=2, ema=(0.9,), schedule_sampler="loss-second-moment")
    full = tiny_config(tmp_path / "full", ds, **kw)
    DiffusionTrainer(full, ds).run()

    killed = tiny_config(tmp_path / "killed", ds, **kw)
    with monkeypatch.context() as m:
        _kill_after_save_at(m, 4)
        with pytest.raises(_Killed):
            DiffusionTrainer(killed, ds).run()
    DiffusionTrainer(dataclasses.replace(killed, resume=True), ds).run()

    def rows(cfg):
        rows = [json.loads(r) for r in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "samples_per_sec"} for r in rows]

    assert rows(killed) == rows(full)
    grids = sorted(p.name for p in (Path(full.out) / "samples").iterdir())
    assert grids == ["step_0000004.png", "step_0000006.png"]
    for name in grids:
        assert (Path(killed.out) / "samples" / name).read_bytes() == (
            Path(full.out) / "samples" / name
        ).read_bytes()


def test_ranks_that_see_other_checkpoints_refuse_to_resume(tmp_path, monkeypatch):
    """A torchrun rank whose machine does not share --out found no checkpoint and trained from
    scratch beside rank 0's resumed run (mixed gradients, then a hang at the end): every rank now
    stops with the same line. Here rank 0 of two, rank 1's view through the all-gather."""
    from fastdiff.training import TrainingError

    ds = tiny_data()
    DiffusionTrainer(tiny_config(tmp_path, ds, max_steps=1, save_every=1), ds).run()
    trainer = DiffusionTrainer(tiny_config(tmp_path, ds, max_steps=2, resume=True), ds)
    trainer.world = 2
    monkeypatch.setattr("fastdiff.training.dist.all_gather_objects", lambda step: [step, None])
    with pytest.raises(TrainingError, match=r"different checkpoints there \(rank 0 step 1, rank 1 none\)"):
        trainer.run()
