"""Training against what users and machines do: divergence, resume mismatches, bad data, full disks."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import signal_during_step
from click.testing import CliRunner
from PIL import Image

from fastdiff.cli.train import train, train_classifier
from fastdiff.training import DiffusionTrainer, TrainingError
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.data import ArrayDataset, DataError, ImageFolderDataset, fingerprint, load_npz
from fastdiff.training.runlog import truncate_log
from tests.test_training import TINY, tiny_config, tiny_data, tiny_npz


def _args(npz, out, *extra):
    return [
        "--data",
        npz,
        "--flags",
        TINY,
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _one_line(result, text):
    assert result.exit_code != 0, result.output
    assert text in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0] and "Traceback" not in result.output, result.output


def test_divergence_stops_at_the_step_keeps_the_checkpoint_and_valid_json(tmp_path):
    out = tmp_path / "run"
    args = _args(
        tiny_npz(tmp_path), out, "--max-steps", "6", "--save-every", "1", "--lr", "1e30", "--grad-clip", "0"
    )
    result = CliRunner().invoke(train, args)
    _one_line(
        result, "training diverged at step 2: the loss is not finite; the last good checkpoint (step 1)"
    )
    for line in (out / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in log.jsonl"))
    latest = ckpt.latest_checkpoint(out)
    if latest is not None:  # whatever was saved holds finite weights
        _, model, _, _ = ckpt.load_checkpoint(out)
        assert all(torch.isfinite(t).all() for t in model.values())


def test_nan_loss_stops_before_touching_weights(tmp_path):
    ds = tiny_data()
    trainer = DiffusionTrainer(tiny_config(tmp_path, ds, ema=()), ds)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    x = torch.stack([ds[i][0] for i in range(4)])
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="step 1: the loss is not finite"):
        trainer.run_step(x, torch.zeros(4, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_fp16_overflow_is_skipped_then_stops_when_it_persists(tmp_path):
    ds = tiny_data()
    trainer = DiffusionTrainer(tiny_config(tmp_path, ds, ema=(), precision="fp16"), ds)
    trainer.scaler.scale(torch.ones(()))  # what run_step's backward does first: start the scale
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    assert trainer._optimize(torch.tensor(1.0)) is False  # the scaler's first chance
    with pytest.raises(TrainingError, match="skipped 25 steps in a row"):
        for _ in range(30):
            trainer.scaler.scale(torch.ones(()))
            for p in trainer.model.parameters():
                p.grad = torch.full_like(p, float("inf"))
            trainer._optimize(torch.tensor(1.0))
    trainer = DiffusionTrainer(tiny_config(tmp_path, ds, ema=(), precision="fp16"), ds)
    trainer.scaler.scale(torch.ones(()))
    with pytest.raises(TrainingError, match="loss is not finite"):
        trainer._optimize(torch.tensor(float("nan")))


@pytest.mark.parametrize(
    "change, text",
    [
        (["--seed", "1"], "seed (0 in the run, 1 now)"),
        (["--batch-size", "2"], "batch size (4 in the run, 2 now)"),
        (["--precision", "bf16"], "precision"),
        (["--ema", "0.9"], "EMA rates"),
        (["--flags", TINY + " --dropout 0.1"], "flag dropout"),
        (["--data"], "data items (16 in the run, 12 now)"),
    ],
)
def test_resume_refuses_other_settings_in_one_line(tmp_path, change, text):
    out = tmp_path / "run"
    npz = tiny_npz(tmp_path)
    base = [*_args(npz, out, "--max-steps", "1"), "--ema", "0.99"]
    assert CliRunner().invoke(train, base).exit_code == 0
    if change == ["--data"]:
        change = ["--data", tiny_npz(tmp_path, n=12, name="other.npz")]
    result = CliRunner().invoke(train, [*base, "--max-steps", "2", "--resume", *change])
    _one_line(result, text)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_training_on_a_cpu_without_native_bf16_is_noted(tmp_path, monkeypatch, emulated):
    """12 s a step against fp32's 0.77 on an AVX2 CPU (the bundled network), without a word."""
    from fastdiff.cli import train_run

    monkeypatch.setattr(train_run, "emulated_bf16", lambda dev: emulated)
    args = _args(tiny_npz(tmp_path), tmp_path / "run", "--max-steps", "1", "--precision", "bf16")
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    assert ("no native bf16" in result.stderr and "--precision bf16" in result.stderr) is emulated


def test_a_step_that_goes_through_restarts_the_fp16_overflow_count(tmp_path):
    """The run stops at 25 overflows in a row, not 25 in all: a run whose scale overflows now and
    then (as fp16's does each time it grows back) trains on."""
    ds = tiny_data()
    trainer = DiffusionTrainer(tiny_config(tmp_path, ds, ema=(), precision="fp16"), ds)

    def optimize(grad: float) -> bool:
        trainer.scaler.scale(torch.ones(()))
        for p in trainer.model.parameters():
            p.grad = torch.full_like(p, grad)
        return trainer._optimize(torch.tensor(1.0))

    for _ in range(2):
        assert not any(optimize(float("inf")) for _ in range(24))
        assert optimize(0.0)


def test_fingerprint_sees_changed_content():
    a, b = tiny_data(), tiny_data()
    b.images[0, 0, 0, 0] ^= 1
    assert fingerprint(a) == fingerprint(tiny_data()) and fingerprint(a) != fingerprint(b)


def _folder(tmp_path, n=4):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "x.jpg")
    return root


def test_truncated_images_are_named_or_skipped(tmp_path):
    root = _folder(tmp_path)
    assert len(ImageFolderDataset(root, 8)) == 9
    png = root / "b" / "1.png"
    png.write_bytes(png.read_bytes()[:-20])
    jpg = root / "a" / "x.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"x\.jpg \(and 1 more\).*--skip-bad-images"):
        ImageFolderDataset(root, 8)
    ds = ImageFolderDataset(root, 8, skip_bad_images=True)
    assert len(ds) == 7 and set(ds.skipped) == {png, jpg} and ds.num_classes == 2
    out = tmp_path / "run"
    args = ["--data", str(root), "--image-size", "8", "--flags", TINY, "--batch-size", "4", "--out", str(out)]
    _one_line(CliRunner().invoke(train, [*args, "--max-steps", "1"]), "x.jpg (and 1 more)")
    ok = CliRunner().invoke(train, [*args, "--max-steps", "1", "--skip-bad-images"])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(
    "command, flags",
    [(train, TINY.replace("True", "False")), (train, TINY), (train_classifier, "--channel_mult 1,2")],
    ids=["train", "train-class-cond", "train-classifier"],
)
def test_a_class_folder_that_cannot_be_listed_is_one_line(tmp_path, unlistable, command, flags):
    """A class folder its user may not list was 'a class folder that holds no images' (class
    labels) or its images were left out unseen (an unconditional run trained on the rest)."""
    root = _folder(tmp_path)
    unlistable(root / "b")
    args = ["--data", str(root), "--image-size", "8", "--flags", flags, "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(command, [*args, "--max-steps", "1", "--skip-bad-images"])
    _one_line(r, f"cannot list folder {root / 'b'}: Permission denied")
    assert r.exit_code == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_skipped_images_are_said_once_per_job(tmp_path, monkeypatch, rank, said):
    """Every rank holds the scan and said which images it skips (N copies of the line under
    torchrun); rank 0 alone says it now, and an error after the scan is still every rank's line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr("fastdiff.runs.ranks.join", lambda device: device)  # one rank, no group
    root = tmp_path / "flat"  # no class_ prefixes: a classifier refuses it once it is read
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "2.png").write_bytes((root / "2.png").read_bytes()[:-20])
    args = ["--data", str(root), "--image-size", "8", "--flags", "--channel_mult 1,2", "--skip-bad-images"]
    args += ["--out", str(tmp_path / "run")]
    r = CliRunner().invoke(train_classifier, args)
    assert r.exit_code != 0 and "needs labelled data" in r.output, r.output
    assert ("skipping 1 unreadable or corrupt image(s)" in r.output) == said, r.output


def test_torn_log_line_is_tolerated_on_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    truncate_log(log, 2)
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2]


def test_fresh_start_drops_a_killed_runs_log(tmp_path):
    """A run killed before its first checkpoint leaves log rows (and maybe a torn line); starting
    again without --resume must not append to them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    assert CliRunner().invoke(train, _args(tiny_npz(tmp_path), out, "--max-steps", "2")).exit_code == 0
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0


def test_full_disk_writing_the_log_is_one_line(tmp_path, monkeypatch):
    import builtins

    from fastdiff.training import loop

    def open_full(path, *args, **kwargs):
        if str(path).endswith("log.jsonl") and args[:1] == ("a",):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(loop, "open", open_full, raising=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(train, _args(tiny_npz(tmp_path), out, "--max-steps", "1"))
    _one_line(result, f"no space left on device writing {out / 'log.jsonl'}")


def test_full_disk_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / ".state_0000001.pt.abcd1234.pt"))

    monkeypatch.setattr(ckpt, "save_torch", full)
    result = CliRunner().invoke(train, _args(tiny_npz(tmp_path), out, "--max-steps", "1"))
    _one_line(result, f"no space left on device writing {out / 'state_0000001.pt'}")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_under_torch_save_is_one_line_and_leaves_no_part_of_the_step(tmp_path, monkeypatch):
    """torch.save on a full disk raised a RuntimeError ('[enforce fail at inline_container.cc:672]
    . unexpected pos ...'), a traceback; and the step's weights, written before it, stayed without
    a latest.json, so both a rerun and --resume refused the folder until the user deleted them."""
    import builtins

    def open_full(path, mode="r", *args, **kwargs):  # the state file's writes go to a full disk
        if "w" in mode and Path(path).name.startswith(".state_"):
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(path, mode, *args, **kwargs)

    with pytest.raises(OSError) as e, monkeypatch.context() as m:
        m.setattr(ckpt, "open", open_full, raising=False)
        ckpt.save_torch({"x": torch.zeros(100_000)}, tmp_path / "state_0000001.pt")
    assert e.value.errno == errno.ENOSPC and Path(e.value.filename).name.startswith(".state_0000001.pt.")
    out = tmp_path / "run"
    args = _args(tiny_npz(tmp_path), out, "--max-steps", "2", "--save-every", "1")
    monkeypatch.setattr(ckpt, "open", open_full, raising=False)
    _one_line(CliRunner().invoke(train, args), f"no space left on device writing {out / 'state_0000001.pt'}")
    assert not [p.name for p in out.iterdir() if ckpt.CHECKPOINT_FILE.fullmatch(p.name)]
    monkeypatch.undo()
    assert CliRunner().invoke(train, args).exit_code == 0
    assert [json.loads(row)["step"] for row in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    real = ckpt.save_torch  # a later step's failure keeps the step latest.json names, and only it

    def second_fails(obj, path):
        if obj["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_torch", second_fails)
    rerun = _args(tiny_npz(tmp_path), tmp_path / "again", "--max-steps", "2", "--save-every", "1")
    assert CliRunner().invoke(train, rerun).exit_code != 0
    kept = sorted(p.name for p in (tmp_path / "again").glob("*_000000?.*"))
    assert kept == ["ema_0.9999_0000001.safetensors", "model_0000001.safetensors", "state_0000001.pt"]


def test_keep_last_and_stale_temp_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".model_0000001.safetensors.abcd1234.safetensors"
    stale.write_bytes(b"x" * 10)
    result = CliRunner().invoke(
        train, _args(tiny_npz(tmp_path), out, "--max-steps", "4", "--save-every", "1", "--keep-last", "2")
    )
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    steps = sorted({p.name.split("_")[-1].split(".")[0] for p in out.glob("model_*.safetensors")})
    assert steps == ["0000003", "0000004"] and len(list(out.glob("state_*.pt"))) == 2
    ckpt.prune_checkpoints(out, 1)
    assert [p.name for p in out.glob("model_*")] == ["model_0000004.safetensors"]


def test_locked_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        _one_line(CliRunner().invoke(train, _args(tiny_npz(tmp_path), out, "--max-steps", "1")), "in use")
    finally:
        os.close(fd)


def test_only_rank_0_says_done(tmp_path, monkeypatch):
    """Under torchrun every rank printed the closing line: it was asked after the process group
    was torn down, when every process calls itself rank 0. Here rank 1, as gloo makes it."""
    torn_down = []
    monkeypatch.setattr("fastdiff.training.dist.cleanup", lambda: torn_down.append(True))
    monkeypatch.setattr("fastdiff.training.dist.is_main", lambda: bool(torn_down))
    result = CliRunner().invoke(train, _args(tiny_npz(tmp_path), tmp_path / "o", "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert torn_down and "done:" not in result.output, result.output


@pytest.mark.parametrize(
    "extra, text",
    [
        (["--num-workers", "-1"], "--num-workers"),
        (["--keep-last", "-1"], "--keep-last"),
        (["--seed", str(2**64)], "--seed must be >= 0 and < 2**63"),  # was torch's OverflowError
        (["--device", ""], "unknown device ''"),  # was torch.device's RuntimeError after loading
        (["--cfg-dropout", "1.5"], "--cfg-dropout must be in [0, 1)"),
        (["--flags", "--num_channels -8"], "--num_channels must be at least 1"),
        (
            ["--cfg-dropout", "0.1", "--flags", "--class_cond False"],
            'model: add "--class_cond True" to --flags',
        ),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]),
)
def test_bad_options_are_one_line(tmp_path, extra, text):
    _one_line(CliRunner().invoke(train, _args(tiny_npz(tmp_path), tmp_path / "o", *extra)), text)


def test_a_bad_fastdiff_ops_is_one_line_before_the_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "bogus")  # was the first layer's ValueError traceback, mid-run
    monkeypatch.setattr("fastdiff.cli.train_run.load_dataset", lambda *a, **k: pytest.fail("data read"))
    result = CliRunner().invoke(train, _args(tiny_npz(tmp_path), tmp_path / "o"))
    _one_line(result, "FASTDIFF_OPS must be one of")


@pytest.mark.parametrize(
    "labels, text",
    [(np.array([0, -1, 1, 0]), "negative"), (np.array([0.0, 1.5, 1, 0]), "integer"), (None, "no images")],
)
def test_bad_npz_data(tmp_path, labels, text):
    images = np.zeros((0 if labels is None else 4, 8, 8, 1), np.uint8)
    path = tmp_path / "bad.npz"
    np.savez(path, images, *([] if labels is None else [labels]))
    with pytest.raises(DataError, match=text):
        load_npz(path)
    _one_line(CliRunner().invoke(train, _args(str(path), tmp_path / "o")), text)


def test_a_cut_npz_is_one_line(tmp_path):
    with open(tiny_npz(tmp_path), "rb") as f:
        whole = f.read()
    for name, size in (("cut.npz", len(whole) // 2), ("head.npz", 100)):  # zipfile's BadZipFile, EOFError
        (tmp_path / name).write_bytes(whole[:size])
        result = CliRunner().invoke(train, _args(str(tmp_path / name), tmp_path / "o"))
        _one_line(result, f"cannot read {tmp_path / name}")
        assert not (tmp_path / "o").exists()


def test_one_class_classifier_data_is_refused(tmp_path):
    path = tiny_npz(tmp_path, classes=1)
    result = CliRunner().invoke(train_classifier, ["--data", path, "--out", str(tmp_path / "c")])
    _one_line(result, "at least 2 classes")
    assert ArrayDataset(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, np.int64)).num_classes == 1


@pytest.mark.parametrize(
    "extra, text",
    [
        (["--flags", "--num_channels=x"], "bad value 'x'"),
        (["--ema", "2"], "EMA rate 2.0"),
        (["--preset", "nope"], "unknown preset"),
    ],
)
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, extra, text):
    _one_line(CliRunner().invoke(train, [*_args(tiny_npz(tmp_path), tmp_path / "o"), *extra]), text)

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr("fastdiff.cli.train_run.DiffusionTrainer", broken)
    result = CliRunner().invoke(train, _args(tiny_npz(tmp_path), tmp_path / "o2", "--max-steps", "1"))
    assert isinstance(result.exception, ValueError) and "an internal bug" in str(result.exception)
    assert "Error: an internal bug" not in result.output


def test_a_real_failed_safetensors_write_is_one_line(tmp_path):
    """safetensors reports its I/O errors (a full disk, a file-size limit) as its own error type,
    not OSError: the first checkpoint on a full disk was a traceback. Here a real write fails:
    the file-size limit (ulimit -f) with SIGXFSZ ignored makes it EFBIG."""
    import resource
    import signal

    out = tmp_path / "run"
    args = _args(tiny_npz(tmp_path), out, "--max-steps", "1")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
    try:
        result = CliRunner().invoke(train, args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    _one_line(result, f"cannot write {out / 'model_0000001.safetensors'}: File too large")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model")]  # no temp file left


def test_a_failed_save_after_a_signal_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The checkpoint a stop writes fails on a full disk: the run's one line (exit 1 in the CLI)
    instead of the signal's exit, and latest.json still names the --save-every checkpoint."""
    ds = tiny_data()
    cfg = tiny_config(tmp_path, ds, max_steps=5, save_every=2)
    trainer = DiffusionTrainer(cfg, ds)
    signal_during_step(trainer, 3)
    real = ckpt.save_torch

    def full(obj, path):
        if obj["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_torch", full)
    with pytest.raises(TrainingError, match="no space left on device writing .*state_0000003.pt"):
        trainer.run()
    assert ckpt.load_checkpoint(cfg.out)[0] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_during_the_stop_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C twice: the second acts at once, in the middle of the first one's save; the atomic
    writes leave no temporary file and the previous checkpoint whole, and --resume continues it."""
    ds = tiny_data()
    cfg = tiny_config(tmp_path, ds, max_steps=4, save_every=2)
    trainer = DiffusionTrainer(cfg, ds)
    signal_during_step(trainer, 3)
    real = ckpt.atomic_write

    def interrupted(path, write):  # step 3's state file written, then the second Ctrl-C before its rename
        if Path(path).name != "state_0000003.pt":
            return real(path, write)
        real(path, lambda tmp: (write(tmp), os.kill(os.getpid(), signal.SIGINT)))

    monkeypatch.setattr(ckpt, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    out = tmp_path / "run"
    assert not [p for p in out.iterdir() if ckpt.is_temp_file(p)]
    assert ckpt.load_checkpoint(out)[0] == 2
    DiffusionTrainer(dataclasses.replace(cfg, resume=True), ds).run()
    assert ckpt.load_checkpoint(out)[0] == 4
