"""`fastdiff sample` against what users and machines do (issue 9): other counts on resume, replaced
weights, two processes on one folder, foreign folders, killed writes, umask, bad classifiers and
hostile files. Kill points are simulated by making a write or rename raise."""

# ruff: noqa: F811  (the `models` fixture is imported from test_cli_sample and requested by name)

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from builders import build_classifier, build_unet, one_line_error
from test_cli_sample import CLASSIFIER_FLAGS, UNET_FLAGS, _randomize, base_args, models, run  # noqa: F401

from fastdiff.models.checkpoint import save_weights


def sample(models, out, n, *extra):
    return run(*base_args(models, out, "--num-samples", n, "--batch-size", 4, "--steps", 2, *extra))


def final(out):
    return sorted(p.name for p in out.glob("samples_*.npz"))


# 1. another --num-samples on --resume


def test_growing_resamples_the_partial_batch_and_replaces_the_final_npz(models, tmp_path):
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert sample(models, fresh, 8).exit_code == 0
    assert sample(models, out, 6).exit_code == 0  # batches of 4 and 2
    r = sample(models, out, 8, "--resume")
    assert r.exit_code == 0, r.output
    assert "4 images (4 already there)" in r.output  # the 2-image batch was not a 4-image one
    assert final(out) == ["samples_8x8x8x3.npz"]
    a, b = np.load(fresh / "samples_8x8x8x3.npz"), np.load(out / "samples_8x8x8x3.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert len(list((out / "images").glob("*.png"))) == 8
    assert json.loads((out / "run.json").read_text())["num_samples"] == 8


def test_shrinking_is_refused_and_changes_nothing(models, tmp_path):
    out = tmp_path / "out"
    assert sample(models, out, 8).exit_code == 0
    before = (out / "run.json").read_text()
    one_line_error(sample(models, out, 6, "--resume"), "for 8 samples", "--num-samples 6")
    assert final(out) == ["samples_8x8x8x3.npz"] and (out / "run.json").read_text() == before


def test_kill_while_writing_the_grown_npz_leaves_no_stale_npz(models, tmp_path, monkeypatch):
    from fastdiff.runs import writer

    out = tmp_path / "out"
    assert sample(models, out, 4).exit_code == 0
    real = writer.save_npz_streamed

    def cut(chunks):
        for chunk in chunks:
            yield chunk
            raise KeyboardInterrupt  # SIGINT/SIGKILL stand-in once a batch is in the final npz

    def killed_at_final(path, members):
        real(path, [(name, shape, dtype, cut(chunks)) for name, shape, dtype, chunks in members])

    monkeypatch.setattr(writer, "save_npz_streamed", killed_at_final)
    assert sample(models, out, 8, "--resume").exit_code != 0
    assert final(out) == []  # the 4-sample npz no longer describes this run
    assert [p.name for p in out.iterdir() if p.name.startswith(".samples_")] == []  # nor half of one
    monkeypatch.setattr(writer, "save_npz_streamed", real)
    r = sample(models, out, 8, "--resume")
    assert r.exit_code == 0 and "0 images (8 already there)" in r.output
    assert final(out) == ["samples_8x8x8x3.npz"]


# 2. weights by content, engine and dtype


def test_run_records_weights_by_content_and_refuses_replaced_weights(models, tmp_path):
    ckpt = tmp_path / "unet.safetensors"
    ckpt.write_bytes((models / "unet.safetensors").read_bytes())
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--steps", 2, "--num-samples", 4, "--batch-size", 2, "--out", out]
    args += ["--classifier", models / "clf.safetensors", "--classifier-scale", 1]
    assert run(*args).exit_code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (
        record["classifier"]["sha256"]
        == hashlib.sha256((models / "clf.safetensors").read_bytes()).hexdigest()
    )
    assert record["engine"] == "eager" and record["dtype"] == "fp32"
    torch.manual_seed(5)
    model = build_unet(**UNET_FLAGS)
    save_weights(model, ckpt, {"flags": UNET_FLAGS})  # same path, other weights
    one_line_error(run(*args, "--resume"), "model weights' sha256 (")
    ckpt.write_bytes((models / "unet.safetensors").read_bytes())
    one_line_error(run(*args, "--resume", "--dtype", "bf16"), "in: dtype")
    one_line_error(run(*args, "--resume", "--engine", "compile"), "in: engine")
    old = json.loads((out / "run.json").read_text())
    del old["model"]["sha256"]  # a run.json from before weights were recorded by content
    (out / "run.json").write_text(json.dumps(old))
    one_line_error(run(*args, "--resume"), "model weights (an older fastdiff made this run")
    (out / "run.json").write_text(json.dumps(record))
    # parallel runs the eager step on batch slices: the same run (its default depends on threads)
    assert run(*args, "--resume", "--engine", "parallel").exit_code == 0
    assert run(*args, "--resume").exit_code == 0


# 3. one process per run folder


def test_second_process_on_the_folder_fails_at_once(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another fastdiff command holds it
        held.write("fastdiff invert")  # the holder's name, as exclusive_folder writes it
        held.flush()
        one_line_error(sample(models, out, 2), "in use by another fastdiff invert")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert sample(models, out, 2).exit_code == 0  # released: the folder is usable


# 4. foreign folders and killed writes' temporary files


def test_non_empty_folder_that_is_not_a_run_is_refused(models, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "grid.png").write_bytes(b"mine")
    one_line_error(sample(models, out, 2), "not empty", "no run.json")
    assert (out / "grid.png").read_bytes() == b"mine" and not (out / "images").exists()


def test_temp_files_of_killed_writes_are_removed(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert sample(models, out, 8).exit_code == 0
    (out / "batches" / "batch_00001.npz").unlink()
    # A kill between write and rename: monkeypatched rename raising keeps the temp file on disk.
    monkeypatch.setattr("os.remove", lambda p: None)
    monkeypatch.setattr("os.replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sample(models, out, 8, "--resume").exit_code != 0
    monkeypatch.undo()
    temps = [p for p in out.rglob(".*") if p.name != ".lock"]
    assert temps, "the injected kill should leave a temporary file"
    (out / "images" / ".000004_class0.png.k1ll3d_x.png").write_bytes(b"half")
    (out / "notes.txt").write_text("mine")  # not a temp file: kept
    r = sample(models, out, 8, "--resume")
    assert r.exit_code == 0, r.output
    assert [p.name for p in out.rglob(".*")] == [".lock"] and (out / "notes.txt").exists()


# 5. umask


def test_files_honour_the_umask(models, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "out"
        assert sample(models, out, 2).exit_code == 0
    finally:
        os.umask(old)
    for p in [out / "run.json", out / "grid.png", out / "samples_2x8x8x3.npz", *out.glob("*/*")]:
        assert p.stat().st_mode & 0o777 == 0o640, p


# 6. classifier checks before any work


@pytest.fixture(scope="module")
def bad_classifiers(tmp_path_factory):
    d = tmp_path_factory.mktemp("clf")
    for name, kw in {
        "3cls": dict(num_classes=3),
        "6cls": dict(num_classes=6),
        "1ch": dict(in_channels=1),
    }.items():
        flags = {**CLASSIFIER_FLAGS, **kw}
        save_weights(build_classifier(**flags), d / f"{name}.safetensors", {"flags": flags})
    return d


@pytest.mark.parametrize(
    "name, words",
    [
        ("3cls", ["3 classes", "model 4"]),
        ("6cls", ["6 classes", "model 4"]),
        ("1ch", ["1-channel", "makes 3"]),
    ],
)
def test_classifier_that_does_not_fit_the_model(models, bad_classifiers, tmp_path, name, words):
    out = tmp_path / "o"
    clf = bad_classifiers / f"{name}.safetensors"
    r = run("--checkpoint", models / "unet.safetensors", "--classifier", clf,
            "--classifier-scale", 1, "--steps", 2, "--num-samples", 1, "--out", out)  # fmt: skip
    one_line_error(r, *words)
    assert not out.exists()  # refused before anything was written


def test_classifier_counts_the_models_real_classes(models, tmp_path):
    """A classifier-free-guidance model has a null label on top of the classifier's classes."""
    flags = {**UNET_FLAGS, "num_classes": 5}
    save_weights(
        _randomize(build_unet(**flags)), tmp_path / "cfg.safetensors", {"flags": flags, "null_label": 4}
    )
    r = run("--checkpoint", tmp_path / "cfg.safetensors", "--classifier", models / "clf.safetensors",
            "--classifier-scale", 1, "--steps", 2, "--num-samples", 2, "--out", tmp_path / "o")  # fmt: skip
    assert r.exit_code == 0, r.output


def test_classifier_without_scale_is_an_error(models, tmp_path):
    r = run("--checkpoint", models / "unet.safetensors", "--classifier", models / "clf.safetensors",
            "--out", tmp_path / "o")  # fmt: skip
    one_line_error(r, "--classifier-scale")
    assert not (tmp_path / "o").exists()


# 7. one clear line each


@pytest.mark.parametrize(
    "extra, words, status",
    [
        (["--classes", ","], ["names no class id"], 1),
        (["--sampler", "ddpm", "--steps", 1], ["--steps must be between 2"], 2),
        (["--sampler", "ddim", "--steps", 1], ["--steps must be between 2"], 2),
        (["--classifier-scale", -1], ["--classifier-scale must be >= 0"], 2),
        (["--classifier-scale", "nan"], ["--classifier-scale must be a finite number"], 2),
        (["--cfg-scale", "inf"], ["--cfg-scale must be a finite number"], 2),
        (["--sampler", "ddim", "--eta", "inf"], ["--eta must be a finite number >= 0"], 2),
        (["--classes", "random", "--seed", -1], ["--seed must be >= 0"], 2),
        (["--device", "meta"], ["not supported"], 2),
        (["--device", "mps"], ["not supported"], 2),
        (["--flags", '--image_size 8 "unterminated'], ["No closing quotation"], 1),
        (["--classifier-flags", "'"], ["No closing quotation"], 1),
        (["--flags", "--use_ddim False"], ["--use_ddim is a sampling-script flag", "--sampler"], 1),
        (["--flags", "--classifier_scale 1.0"], ["--classifier_scale is a sampling-script flag"], 1),
        (["--flags", "--image_size 9"], ["flag --image_size 9 contradicts the flags"], 1),
        (["--classes", "1,,2"], ["--classes must be class ids", "'1,,2'"], 1),
        (["--classes", ""], ["names no class id"], 1),
        (["--seed", 2**63], ["--seed must be >= 0 and < 2**63"], 2),
        (["--checkpoint", "/"], ["checkpoint / is a folder"], 1),
        (["--num-samples", 10**20], ["--num-samples must be at most 10000000"], 2),
    ],
)
def test_bad_arguments(models, tmp_path, extra, words, status):
    """2: a number out of its option's range or a name not among its choices, as click's own
    checks; 1: the rest (the text of --flags or --classes, what a file refuses)."""
    out = tmp_path / "o"
    one_line_error(run(*base_args(models, out, "--num-samples", 1), *extra), *words, status=status)
    assert not out.exists()


def test_unbalanced_quote_in_train_flags_is_one_line(tmp_path):
    """parse_flags is where every command's --flags is split, train's included."""
    from click.testing import CliRunner

    from fastdiff.cli.main import main

    r = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(tmp_path / "data"),
            "--flags",
            "--image_size '32",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    one_line_error(r, "No closing quotation")


def test_unusable_onnx_cache_is_one_line_before_the_run_folder(models, tmp_path, monkeypatch):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "afile"))
    out = tmp_path / "o"
    one_line_error(
        sample(models, out, 1, "--engine", "onnx"), "ONNX cache", "FASTDIFF_CACHE", "Not a directory"
    )
    assert not out.exists()


def test_unwritable_out(models, tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(sample(models, tmp_path / "file" / "out", 1), "cannot write to --out")
    one_line_error(sample(models, tmp_path / "file", 1), "is not a folder")
    one_line_error(sample(models, "/proc/fastdiff", 1), "cannot write to --out")


def test_full_disk_is_one_line_and_loses_no_batch(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = np.savez

    def full(f, *a):
        if "batch_00001" in str(getattr(f, "name", f)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, *a)

    monkeypatch.setattr(np, "savez", full)
    one_line_error(sample(models, out, 8), "No space left on device")
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "batches").iterdir()) == ["batch_00000.npz"]
    r = sample(models, out, 8, "--resume")
    assert r.exit_code == 0 and "4 images (4 already there)" in r.output


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda o: (o / "batches" / "batch_00000.npz").write_bytes(b""), ["batch_00000.npz is unreadable"]),
        (lambda o: (o / "batches" / "batch_00000.npz").write_bytes(b"PK\x03\x04junk"), ["is unreadable"]),
        (lambda o: np.savez(o / "batches" / "batch_00000.npz", np.zeros((4, 2))), ["delete it"]),
        (lambda o: (o / "run.json").write_text(""), ["run.json is unreadable"]),
        (lambda o: (o / "run.json").write_text("[1]"), ["not a fastdiff sampling run"]),
    ],
)
def test_damaged_run_folder_on_resume(models, tmp_path, damage, words):
    out = tmp_path / "out"
    assert sample(models, out, 8).exit_code == 0
    damage(out)
    one_line_error(sample(models, out, 8, "--resume"), *words)


def test_model_options_name_what_the_user_got_wrong(models, tmp_path):
    one_line_error(run("--preset", "imagenet46", "--out", tmp_path / "o"), "unknown preset 'imagenet46'")
    args = base_args(models, tmp_path / "o", "--classifier", models / "unet.pt")
    one_line_error(run(*args), "no classifier preset for 8px images", "--classifier-flags")


def test_a_raw_pickle_is_refused_without_torchs_warning(models, tmp_path):
    import pickle
    import warnings

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = run("--preset", "imagenet64", "--checkpoint", raw, "--out", tmp_path / "o")
    one_line_error(r, "cannot read checkpoint", "weights_only=True")
    assert not [w for w in seen if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize("data", [b"", b"hello, I am text\n", b"\xff" * 64])
def test_unreadable_checkpoint_is_one_line(models, tmp_path, data):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    one_line_error(run("--checkpoint", bad, "--out", tmp_path / "o"), "cannot read checkpoint")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((models / "unet.safetensors").read_bytes()[:-100])
    one_line_error(run("--checkpoint", truncated, "--out", tmp_path / "o"), "truncated")


@pytest.mark.parametrize("name", ["latest.json", "notes.txt", "weights.pt"])
def test_a_file_that_is_no_checkpoint_says_so_before_flags_are_asked_for(tmp_path, name):
    """Without a preset or flags, a text file given as --checkpoint was asked its flags ('say which
    diffusion model this is'), as if passing flags would make it load; a real .pt still is."""
    bad = tmp_path / name
    bad.write_text('{"step": 1}\n')
    one_line_error(run("--checkpoint", bad, "--out", tmp_path / "o"), "not a file torch.save wrote")
    pt = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    one_line_error(run("--checkpoint", pt, "--out", tmp_path / "o2"), "say which diffusion model")


# 8. user errors are one line, bugs keep their traceback


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"num_channels": -8}, ["--num_channels must be at least 1"]),
        ({"num_channels": 40}, ["multiple of 32"]),
        ({"num_channels": "wide"}, ["--num_channels 'wide'"]),
        ({"bogus": 1}, ["diffusion flags: unknown flag --bogus"]),
        ({"image_size": 48, "channel_mult": ""}, ["unsupported image size 48"]),
        ({"num_channels": 4096}, ["does not fit", "wrong shapes"]),  # no 4096-channel network is built
    ],
)
def test_checkpoint_metadata_that_lies(models, tmp_path, flags, words):
    ckpt = tmp_path / "lying.safetensors"
    ckpt.write_bytes((models / "unet.safetensors").read_bytes())
    sd = __import__("safetensors.torch", fromlist=["x"]).load_file(ckpt)
    save_weights(sd, ckpt, {"flags": {**UNET_FLAGS, **flags}})
    one_line_error(run("--checkpoint", ckpt, "--steps", 2, "--out", tmp_path / "o"), *words)


def test_sampling_flags_in_older_metadata_are_not_the_network(models, tmp_path):
    """An older fastdiff stored whatever --flags its trainer got; the sampling flags among them
    never described the network, so the file still loads."""
    ckpt = tmp_path / "older.safetensors"
    sd = __import__("safetensors.torch", fromlist=["x"]).load_file(models / "unet.safetensors")
    save_weights(sd, ckpt, {"flags": {**UNET_FLAGS, "use_ddim": True, "classifier_scale": 4.0}})
    r = run("--checkpoint", ckpt, "--steps", 2, "--num-samples", 1, "--out", tmp_path / "o", "--no-progress")
    assert r.exit_code == 0, r.output


def test_a_bug_keeps_its_traceback(models, tmp_path, monkeypatch):
    def broken(config, device=None):
        raise ValueError("a bug deep inside the model code")

    monkeypatch.setattr("fastdiff.runs.loading.build_network", broken)
    r = sample(models, tmp_path / "o", 1)
    assert isinstance(r.exception, ValueError) and "a bug deep inside" in str(r.exception)


@pytest.mark.parametrize(
    "signum, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_mid_run_is_one_line_after_the_closed_bar_and_resumes(tmp_path, signum, status, word):
    """Ctrl-C and a scheduler's SIGTERM, sent to the process group as a terminal and SLURM do:
    the bar ends its line, one line says how to continue, and --resume finishes the run. SIGTERM
    used to kill at once (status -15, no message, the bar's line left open, as Ctrl-C's was)."""
    out = tmp_path / "run"
    args = ["--threads", "1", "--device", "cpu", "--num-samples", "4", "--batch-size", "1", "--steps", "10"]
    args += ["--out", str(out)]
    cmd = [sys.executable, "-m", "fastdiff.cli.main", "sample", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    deadline = time.monotonic() + 300  # bounds a hang only: a loaded machine starts torch slowly
    while not (out / "batches" / "batch_00000.npz").exists():
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no batch written"
        time.sleep(0.02)
    os.killpg(p.pid, signum)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == status, err
    assert err.endswith(f"step/s]\n{word}: run the same command with --resume to continue\n"), err[-300:]
    assert "Traceback" not in err and not (out / "samples_4x32x32x1.npz").exists()
    r = run(*args, "--resume")
    assert r.exit_code == 0 and "already there" in r.output and (out / "samples_4x32x32x1.npz").is_file(), (
        r.output
    )


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_folder(models, tmp_path, monkeypatch):
    """Writing the holder's name into the lock is a run's first write: on a full disk it was an
    OSError traceback, and the --out folder it had just made stayed behind."""

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "ftruncate", full)
    out = tmp_path / "new" / "run"
    one_line_error(sample(models, out, 2), f"cannot write to --out {out}: No space left on device")
    assert not out.exists()
    out.mkdir()  # a folder the user made stays, with the lock file
    one_line_error(sample(models, out, 2), "No space left on device")
    assert [p.name for p in out.iterdir()] == [".lock"]
