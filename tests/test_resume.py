"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
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
from builders import kill_when, signal_during_step
from click.testing import CliRunner
from safetensors.torch import load_file

from fastdiff.cli.train import train
from fastdiff.training import DiffusionTrainer
from tests.test_train_hardening import _args
from tests.test_training import tiny_config, tiny_data, tiny_npz

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
    kill_when(proc, out / "latest.json")
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


def test_a_resume_at_the_same_threads_is_bit_for_bit_and_at_others_goes_on_with_a_note(tmp_path):
    """Another thread count splits the steps' float sums otherwise (about 1e-6 apart): a resume at
    the same --threads repeats the uninterrupted run bit for bit; one at another count is not
    refused (sampling's resume allows it too), and one line says the run is no longer exact."""
    npz = tiny_npz(tmp_path)
    before = torch.get_num_threads()

    def run(out, *extra):
        args = _args(npz, out, "--save-every", "1", "--ema", "0.9", *extra)
        result = CliRunner().invoke(train, args)
        assert result.exit_code == 0, result.output
        return result.stderr

    try:
        run(tmp_path / "full", "--max-steps", "2", "--threads", "2")
        run(tmp_path / "cut", "--max-steps", "1", "--threads", "2")
        shutil.copytree(tmp_path / "cut", tmp_path / "other")
        same = run(tmp_path / "cut", "--max-steps", "2", "--threads", "2", "--resume")
        other = run(tmp_path / "other", "--max-steps", "2", "--threads", "1", "--resume")
    finally:
        torch.set_num_threads(before)  # the command set this process's count
    assert "thread" not in same, same
    note = (
        "note: the checkpoint's steps ran with 2 CPU threads, the resume's with 1 CPU thread: float sums "
        "about 1e-6 apart from an uninterrupted run's (the same --threads continues it bit for bit)\n"
    )
    assert note in other, other
    for name in ("model_0000002.safetensors", "ema_0.9_0000002.safetensors"):
        a, b = (load_file(tmp_path / run_ / name) for run_ in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for run_, threads in (("full", 2), ("cut", 2), ("other", 1)):
        state = torch.load(tmp_path / run_ / "state_0000002.pt", weights_only=True)
        assert state["threads"] == threads, run_


def test_adamw_takes_its_multi_tensor_kernels_bit_for_bit_and_keeps_them_on_older_resumes(tmp_path):
    """AdamW runs its foreach kernels on the CPU too, where torch's default is its per-parameter
    loop: the same weights and moments to the bit. A resume keeps them where the checkpoint's
    optimizer state, saved before (foreach None), would bring the loop back."""
    ds = tiny_data()

    def trainer(name, max_steps, foreach=True, **kw):
        config = tiny_config(tmp_path / name, ds, max_steps=max_steps, ema=(0.9,), weight_decay=0.1, **kw)
        t = DiffusionTrainer(config, ds)
        assert t.opt.param_groups[0]["foreach"] is True
        t.opt.param_groups[0]["foreach"] = foreach
        t.run()
        return t

    loop = trainer("loop", 3, foreach=False)
    trainer("resumed", 1, foreach=None)  # an older fastdiff's checkpoint
    resumed = trainer("resumed", 3, resume=True)
    assert resumed.opt.param_groups[0]["foreach"] is True
    assert all(torch.equal(a, b) for a, b in zip(loop.model.parameters(), resumed.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(loop.ema.params[0.9], resumed.ema.params[0.9]))
    for a, b in zip(loop.opt.state.values(), resumed.opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


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


@pytest.fixture
def cli_signals():
    """SIGTERM handled as the fastdiff group handles it (raised as Terminated) for the test's span."""
    from fastdiff.cli.main import _terminate

    previous = signal.signal(signal.SIGTERM, _terminate)
    yield _terminate
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_step_saves_that_step_and_the_resume_matches_uninterrupted(
    tmp_path, cli_signals, signum
):
    """SIGTERM (a scheduler's stop) or Ctrl-C mid-step: the step finishes, its checkpoint is
    written, and only then the signal acts (Terminated / KeyboardInterrupt as the CLI turns them
    into 143 / 130). The steps after the last --save-every checkpoint used to be lost."""
    from fastdiff.cli.main import Terminated

    ds = tiny_data()
    kw = {"max_steps": 5, "save_every": 2, "log_every": 1, "ema": (0.9,)}
    full = tiny_config(tmp_path / "full", ds, **kw)
    DiffusionTrainer(full, ds).run()

    stopped = tiny_config(tmp_path / "stopped", ds, **kw)
    trainer = DiffusionTrainer(stopped, ds)
    signal_during_step(trainer, 3, signum)
    with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
        trainer.run()
    assert json.loads((Path(stopped.out) / "latest.json").read_text())["step"] == 3
    # the handlers from before the run are back (the group's SIGTERM one turns itself off as it acts)
    assert signal.getsignal(signal.SIGTERM) is (signal.SIG_DFL if signum == signal.SIGTERM else cli_signals)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    DiffusionTrainer(dataclasses.replace(stopped, resume=True), ds).run()
    for name in ("model_0000005.safetensors", "ema_0.9_0000005.safetensors"):
        a, b = (load_file(Path(c.out) / name) for c in (full, stopped))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # five training processes: CI's slow stage runs it
def test_sigterm_to_the_process_group_saves_and_resumes_bit_identical(tmp_path):
    """SLURM's stop, SIGTERM to every process of the job (DataLoader workers included): exit 143
    with the one line, a checkpoint of the step it was in though --save-every is far off, and the
    resume ends with the weights of an uninterrupted run, with and without workers."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8), np.arange(10) % 3)
    npz = str(tmp_path / "d.npz")
    cli = [sys.executable, "-m", "fastdiff.cli.main", "train"]
    full = subprocess.run(
        _cmd(npz, tmp_path / "full"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert full.returncode == 0, full.stderr[-2000:]
    for workers in ("0", "2"):
        out = tmp_path / f"stopped{workers}"
        cmd = [*cli, *_cmd(npz, out, "--save-every", "100", "--num-workers", workers)[3:]]
        proc = subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for line in proc.stdout:  # the log row of step 4: well into the run, far from its end
            if line.startswith("step 4 "):
                break
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode == 143, err[-2000:]
        assert err.endswith("terminated: run the same command with --resume to continue\n"), err[-2000:]
        stopped_at = json.loads((out / "latest.json").read_text())["step"]
        assert 4 <= stopped_at < STEPS
        resumed = subprocess.run(
            [*cli, *_cmd(npz, out, "--num-workers", workers, "--resume")[3:]],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        for a, b in zip(_weights(tmp_path / "full"), _weights(out)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), workers


RANK_SCRIPT = """
import os, signal, sys
from pathlib import Path
from fastdiff.cli.main import Terminated, _terminate
from fastdiff.models import configs_from_flags, parse_flags
from fastdiff.training import DiffusionTrainer, TrainConfig, dist, fit_unet
from fastdiff.training.data import load_npz

signal.signal(signal.SIGTERM, _terminate)  # as the fastdiff group does
npz, out = sys.argv[1], Path(sys.argv[2])
ds = load_npz(npz)
flags = parse_flags("--num_channels 32 --num_res_blocks 1 --channel_mult 1,2")
net, process = configs_from_flags("diffusion", flags)
cfg = TrainConfig(net=fit_unet(net, ds, 0.0), process=process, out=str(out), batch_size=4, max_steps=1000,
                  log_every=1, save_every=0, device="cpu", progress=False)
trainer = DiffusionTrainer(cfg, ds)
out.mkdir(exist_ok=True)
(out / f"pid{dist.rank()}").write_text(str(os.getpid()))
try:
    trainer.run()
except Terminated:
    (out / f"stopped{dist.rank()}").write_text(str(trainer.step))
    dist.cleanup()
    sys.exit(143)
"""


@pytest.mark.slow  # a torchrun job: CI's slow stage runs it
def test_sigterm_to_one_torchrun_rank_stops_every_rank_after_the_same_step(tmp_path):
    """A SIGTERM that reaches rank 1 alone: each step's gather carries the signals the ranks hold,
    so both ranks finish that step, rank 0 writes its checkpoint, and both exit (no rank is left
    waiting at a collective for one that stopped)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), np.arange(8) % 2)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "rank.py"), str(tmp_path / "d.npz"), str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    deadline = time.time() + 300
    log = out / "log.jsonl"
    while not ((out / "pid1").exists() and log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.kill(int((out / "pid1").read_text()), signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    steps = [int((out / f"stopped{r}").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] == json.loads((out / "latest.json").read_text())["step"], err[-3000:]
