"""What train and train-classifier refuse, in one line and before the work it would spoil:
settings, held-out data, run folders that are not a resumable run, and damaged checkpoints."""

from __future__ import annotations

import json
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fastdiff.cli.train import train, train_classifier
from fastdiff.config import ConfigError
from fastdiff.models import ClassifierConfig, configs_from_flags, parse_flags
from fastdiff.training import (
    DataError,
    ImageFolderDataset,
    fit_classifier,
    fit_unet,
    load_npz,
    match_classes,
    parse_ema_rates,
)
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.data import ArrayDataset, worker_error
from tests.test_train_hardening import _args, _one_line
from tests.test_training import TINY, tiny_config, tiny_data, tiny_npz

CLASSIFIER = (
    "--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 4 "
    "--channel_mult 1,2 --diffusion_steps 50"
)


@pytest.mark.parametrize(
    "extra, text",
    [
        (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
        (["--warmup-steps", "-5"], "--warmup-steps must not be negative"),
        (["--grad-clip", "-1"], "--grad-clip must be a number >= 0"),
        (["--sample-every", "-1"], "--sample-every must not be negative"),
        (["--save-every", "-1"], "--save-every must not be negative"),
        (["--log-every", "0"], "--log-every must be at least 1"),
        (["--seed", "-1"], "--seed must not be negative"),
        (["--image-size", "0"], "--image-size must be at least 1"),
        (
            ["--sample-every", "1", "--sample-steps", "0"],
            "--sample-steps must be between 2 and diffusion_steps (50)",
        ),
        (
            ["--sample-every", "1", "--sample-steps", "500"],
            "--sample-steps must be between 2 and diffusion_steps",
        ),
        (["--sample-every", "1", "--sample-steps", "20"], "cannot create exactly 20 steps"),
        (["--device", "foo"], "unknown device 'foo'"),
        (["--ema", "0.999,0.999"], "name a rate twice"),
        (["--num-workers", "100000"], "--num-workers must be at most"),
        (["--num-workers", "-1"], "--num-workers must not be negative"),
        (["--threads", str(10**20)], "--threads must be between 1 and 4096"),
        (
            ["--flags", TINY.replace("--diffusion_steps 50", "--diffusion_steps 20 --noise_schedule linear")],
            "diffusion_steps 20 ends at alpha_bar 0",
        ),
    ],
)
def test_bad_settings_are_refused_before_the_data_is_read(tmp_path, extra, text):
    # The data does not exist: any other error would mean it was looked at first.
    _one_line(CliRunner().invoke(train, _args(str(tmp_path / "nope.npz"), tmp_path / "o", *extra)), text)


def test_classifier_settings_are_refused_before_the_data_is_read(tmp_path):
    def run(*extra):
        return CliRunner().invoke(
            train_classifier, ["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "c"), *extra]
        )

    _one_line(run("--lr", "-1"), "--lr must be a positive number")
    _one_line(run("--eval-every", "5"), "--eval-every needs --val-data")
    _one_line(run("--val-data", "mnist"), "--val-data is only read for --eval-every N")


@pytest.mark.parametrize("command", [train, train_classifier])
def test_the_size_given_by_image_size_and_in_flags_must_agree(tmp_path, command):
    """--flags "--image_size 16" --image-size 32 trained at 32 without a word; now a contradiction
    is refused (exit 2), sizes that agree are taken, and an error names the option typed."""
    size = ["--flags", "--image_size 16 --channel_mult 1,2", "--image-size"]
    common = ["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o"), *size]
    res = CliRunner().invoke(command, [*common, "32"])
    _one_line(res, "--image-size 32 contradicts --image_size 16 in --flags; give the size once")
    assert res.exit_code == 2
    _one_line(CliRunner().invoke(command, [*common, "16"]), "nope.npz")  # agreed: the data is next
    common[common.index(size[1])] = "--channel_mult 1,2"
    res = CliRunner().invoke(command, [*common, "33"])
    _one_line(res, "--image-size 33 must be divisible by 2 (--channel_mult has 2 levels")
    assert "--image_size" not in res.output
    # the fix says where a flag goes, in --flags' own words (it said "pass --channel_mult"), and
    # that it joins the flags given: 'add --flags "..."' read as a second --flags, which replaced them
    assert res.output.rstrip().endswith('image): add "--channel_mult 1" to --flags'), res.output
    res = CliRunner().invoke(command, ["--data", str(tmp_path / "nope.npz"), "--image-size", "48"])
    _one_line(res, "unsupported image size 48 without a --channel_mult (the defaults are for 32,")
    assert res.output.rstrip().endswith('add "--channel_mult 1,2,2,2" to --flags'), res.output


def test_an_option_spelling_of_a_flag_the_network_kind_lacks_is_ignored():
    """configs_from_flags' ``spelled`` renames a flag the user gave as an option; for a kind
    without that flag (an upsampler has large_size, not image_size) it named nothing and raised
    KeyError instead of the FlagError."""
    from fastdiff.models.flags import FlagError, configs_from_flags

    with pytest.raises(FlagError, match="unsupported image size 33"):
        configs_from_flags("superres", {"large_size": 33}, {"image_size": "--image-size"})


def test_out_inside_the_data_folder_is_refused_before_it_is_read(tmp_path):
    """The run's samples/ would be a class of the next run's data: refused, nothing written."""
    data = _classes(tmp_path / "data", ["cat", "dog"])
    for out in (data, data / "run"):
        _one_line(CliRunner().invoke(train, _args(str(data), out)), "is inside the --data folder")
        res = CliRunner().invoke(train_classifier, ["--data", str(data), "--out", str(out)])
        _one_line(res, "is inside the --data folder")
    assert sorted(p.name for p in data.iterdir()) == ["cat", "dog"]


def test_out_holding_other_files_is_refused_before_anything_is_written(tmp_path):
    """A fresh run writes log.jsonl, loss.png, samples/ and checkpoints into --out: a folder with
    files of its own (a photo folder, another tool's run) is refused, and nothing in it changes;
    a run killed before its first checkpoint left only files of a run, which a new run takes over."""
    npz = tiny_npz(tmp_path)
    for rel in ("notes.txt", "samples/cat.png", ".hidden"):
        out = tmp_path / rel.replace("/", "_") / "out"
        (out / rel).parent.mkdir(parents=True)
        (out / rel).write_text("mine")
        (out / "log.jsonl").write_text("a user's log\n")
        for cmd, args in ((train, _args(npz, out)), (train_classifier, ["--data", npz, "--out", str(out)])):
            _one_line(CliRunner().invoke(cmd, args), f"holds files that are no training run's ({rel}")
        assert (out / rel).read_text() == "mine" and (out / "log.jsonl").read_text() == "a user's log\n"
        assert not (out / ".lock").exists()
    killed = tmp_path / "killed"
    (killed / "samples").mkdir(parents=True)
    for rel in (
        "log.jsonl",
        "loss.png",
        ".lock",
        "samples/step_0000004.png",
        "samples/.step_0000008.png.ab12cd_3.png",
    ):
        (killed / rel).write_text("")
    assert ckpt.foreign_entries(killed) == [] and ckpt.foreign_entries(tmp_path / "new") == []


def test_train_config_checks_itself(tmp_path):
    ds = tiny_data()
    with pytest.raises(ConfigError, match="--warmup-steps"):
        tiny_config(tmp_path, ds, warmup_steps=-1)
    with pytest.raises(ConfigError, match="--sample-steps"):
        tiny_config(tmp_path, ds, sample_every=1, sample_steps=1)
    assert tiny_config(tmp_path, ds, sample_every=0, sample_steps=1).sample_steps == 1  # unused: not checked


def _classes(root, names, n=2):
    for c in names:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_held_out_classes_are_numbered_as_in_training(tmp_path):
    train_ds = ImageFolderDataset(_classes(tmp_path / "train", ["cat", "dog"]), 8)
    val = ImageFolderDataset(_classes(tmp_path / "dogs", ["dog"]), 8)
    assert val.labels.tolist() == [0, 0]  # its own numbering
    match_classes(val, train_ds)
    assert val.labels.tolist() == [1, 1] and val.num_classes == 2 and val[0][1] == 1
    with pytest.raises(DataError, match="lacks: fish, whale"):
        match_classes(ImageFolderDataset(_classes(tmp_path / "fish", ["fish", "whale"]), 8), train_ds)
    with pytest.raises(DataError, match="lacks: bird"):
        match_classes(ImageFolderDataset(_classes(tmp_path / "v3", ["bird", "cat", "dog"]), 8), train_ds)
    with pytest.raises(DataError, match="1-channel images; the training data has 3"):
        match_classes(ImageFolderDataset(tmp_path / "dogs", 8, channels=1), train_ds)
    numbered = tiny_data(classes=3, channels=3)
    with pytest.raises(DataError, match="label 2; the training data has 2 classes"):
        match_classes(numbered, train_ds)
    with pytest.raises(DataError, match="no labels"):
        match_classes(ArrayDataset(numbered.images, None), train_ds)


def test_held_out_data_is_checked_before_training(tmp_path):
    data = _classes(tmp_path / "train", ["cat", "dog"], n=4)
    _classes(tmp_path / "fish", ["fish", "whale"])
    out = tmp_path / "c"
    args = ["--data", str(data), "--image-size", "8", "--flags", CLASSIFIER, "--batch-size", "4"]
    result = CliRunner().invoke(
        train_classifier,
        [*args, "--val-data", str(tmp_path / "fish"), "--eval-every", "1", "--out", str(out)],
    )
    _one_line(result, "--val-data has classes the training data lacks: fish, whale")
    assert not (out / "latest.json").exists()


def test_checkpoint_files_without_latest_json_are_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stray = out / "model_0000001.safetensors"
    stray.write_bytes(b"another run's weights")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for resume in ([], ["--resume"]):
        result = CliRunner().invoke(train, [*_args(tiny_npz(tmp_path), out, "--max-steps", "1"), *resume])
        _one_line(result, "holds checkpoint files (model_0000001.safetensors) but no latest.json")
    assert stray.read_bytes() == b"another run's weights"
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def _fake_run(out, kind, step=3):
    """A run folder with only what is read before the data: latest.json and the model's metadata."""
    ckpt.save_checkpoint(out, step, {"w": torch.zeros(1)}, {}, {"step": step}, {"kind": kind})


@pytest.mark.parametrize(
    "command, kind, text",
    [
        (train, "classifier", "holds a classifier run; continue it with `fastdiff train-classifier`"),
        (train_classifier, "diffusion", "holds a diffusion run; continue it with `fastdiff train`"),
    ],
)
def test_resuming_the_other_kind_of_run_is_one_line(tmp_path, command, kind, text):
    out = tmp_path / "run"
    _fake_run(out, kind)
    result = CliRunner().invoke(
        command, ["--data", str(tmp_path / "nope.npz"), "--out", str(out), "--resume"]
    )
    _one_line(result, text)


def test_resuming_past_max_steps_is_one_line(tmp_path):
    out = tmp_path / "run"
    _fake_run(out, "diffusion", step=30)
    result = CliRunner().invoke(
        train, _args(str(tmp_path / "nope.npz"), out, "--max-steps", "20", "--resume")
    )
    _one_line(result, "is already at step 30, past --max-steps 20")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 1-step run with two EMAs, copied by each test that damages or resumes it."""
    tmp = tmp_path_factory.mktemp("finished")
    npz = tiny_npz(tmp)
    out = tmp / "run"
    base = [*_args(npz, out, "--max-steps", "1"), "--ema", "0.99,0.9", "--microbatch", "2"]
    result = CliRunner().invoke(train, base)
    assert result.exit_code == 0, result.output
    return npz, out, base


def _copy(finished_run, tmp_path):
    npz, out, base = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [a if a != str(out) else str(copy) for a in base] + ["--max-steps", "2", "--resume"]


@pytest.mark.parametrize(
    "change, text",
    [
        (
            ["--schedule-sampler", "loss-second-moment"],
            "schedule sampler ('uniform' in the run, 'loss-second-moment' now)",
        ),
        (["--random-flip"], "random flip (False in the run, True now)"),
        (["--ema-warmup"], "ema warmup (False in the run, True now)"),
        (["--cfg-dropout", "0.1"], "cfg dropout (0.0 in the run, 0.1 now)"),
        (["--microbatch", "4"], "micro-batch size (2 in the run, 4 now)"),
    ],
)
def test_resume_refuses_other_training_settings(finished_run, tmp_path, change, text):
    """Which of each pair was the run's went unsaid, and so did the fix."""
    _, args = _copy(finished_run, tmp_path)
    res = CliRunner().invoke(train, [*args, *change])
    _one_line(res, f"other settings: {text}; resume with the run's options")


def test_resume_may_change_the_learning_rate_schedule(finished_run, tmp_path):
    """recipes/README.md's second phase resumes with another --lr and --anneal, and --weight-decay:
    the optimizer's state brought back the checkpoint's decay, so a new one was recorded unused.
    One line on stderr says what changed (nothing did: a mistyped --lr went unnoticed)."""
    out, args = _copy(finished_run, tmp_path)
    change = ["--lr", "5e-4", "--anneal", "--warmup-steps", "2", "--weight-decay", "0.5"]
    result = CliRunner().invoke(train, [*args, *change])
    assert result.exit_code == 0, result.output
    line = (
        "note: the resume changes the checkpoint's LR schedule: --lr 0.0001 -> 0.0005, --warmup-steps "
        "0 -> 2, --anneal off -> to step 2, --weight-decay 0 -> 0.5\n"
    )
    assert line in result.stderr and "LR schedule" not in result.stdout, result.output
    record = json.loads((out / "latest.json").read_text())
    assert record["step"] == 2
    state = torch.load(out / record["state"], weights_only=False)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.5]


def test_a_resume_with_the_same_schedule_notes_no_change(finished_run, tmp_path):
    _, args = _copy(finished_run, tmp_path)
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0 and "LR schedule" not in result.output, result.output


def _damage(out, how):
    record = json.loads((out / "latest.json").read_text())
    if how == "state cut short":
        path = out / record["state"]
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "model cut short":
        path = out / record["model"]
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "EMA deleted":
        (out / record["ema"]["0.9"]).unlink()
    elif how == "latest.json cut short":
        (out / "latest.json").write_text(json.dumps(record)[:20])
    elif how == "latest.json a list":
        (out / "latest.json").write_text("[]")
    elif how == "state of another step":
        (out / "latest.json").write_text(json.dumps({**record, "step": 2}))


@pytest.mark.parametrize(
    "how, text",
    [
        ("state cut short", "cannot read checkpoint"),
        ("model cut short", "not a valid safetensors file"),
        ("EMA deleted", "checkpoint not found"),
        ("latest.json cut short", "latest.json"),
        ("latest.json a list", "is not a checkpoint record"),
        ("state of another step", "is not the training state of step 2"),
    ],
)
def test_damaged_checkpoints_are_one_line_on_resume(finished_run, tmp_path, how, text):
    out, args = _copy(finished_run, tmp_path)
    _damage(out, how)
    _one_line(CliRunner().invoke(train, args), text)


@pytest.mark.parametrize(
    "command, flags, extra, omp",
    [(train, TINY, ["--threads", "2"], "1"), (train_classifier, CLASSIFIER, [], "2")],
)
def test_the_training_commands_run_at_the_threads_chosen_for_them(
    tmp_path, monkeypatch, command, flags, extra, omp
):
    """train and train-classifier took torch's default of every core (up to 12x slower on a busy
    machine); their steps now run with --threads, else OMP_NUM_THREADS, as every checkpoint records."""
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    out = tmp_path / "run"
    args = ["--data", tiny_npz(tmp_path), "--flags", flags, "--batch-size", "4", "--max-steps", "1"]
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(command, [*args, "--out", str(out), *extra])
    finally:
        torch.set_num_threads(before)  # the command set this process's count
    assert result.exit_code == 0, result.output
    record = json.loads((out / "latest.json").read_text())
    assert torch.load(out / record["state"], weights_only=True)["threads"] == 2


def test_close_ema_rates_keep_their_own_files(tmp_path):
    rates = (0.9999999, 0.99999991)
    assert len({ckpt.ema_name(r) for r in rates}) == 2 and all(float(ckpt.ema_name(r)) == r for r in rates)
    assert ckpt.ema_name(0.9999) == "0.9999"  # the names of earlier runs' usual rates stay
    record = ckpt.save_checkpoint(
        tmp_path, 1, {"w": torch.ones(1)}, {r: {"w": torch.full((1,), r)} for r in rates}, {"step": 1}
    )
    _, _, emas, _ = ckpt.load_checkpoint(tmp_path)
    assert len(set(record["ema"].values())) == 2
    assert [float(emas[ckpt.ema_name(r)]["w"]) for r in rates] == pytest.approx(rates)
    with pytest.raises(ConfigError, match="twice"):
        parse_ema_rates("0.9,0.9")


def test_channel_first_npz_is_named(tmp_path):
    path = tmp_path / "nchw.npz"
    np.savez(path, np.zeros((4, 3, 8, 8), np.uint8), np.arange(4) % 2)
    with pytest.raises(DataError, match=r"nchw\.npz: .* looks like N x C x H x W"):
        load_npz(path)


def _scrambled(path):
    """A PNG whose header and IEND survive (the start-up scan passes it) but whose data does not decode."""
    b = bytearray(path.read_bytes())
    b[45:-20] = bytes((x * 7 + 3) % 256 for x in b[45:-20])  # IDAT's data (its header ends at 41)
    path.write_bytes(bytes(b))


def test_an_image_that_does_not_decode_is_one_line_or_stood_in_for(tmp_path):
    root = tmp_path / "imgs"
    for c, value in (("a", 50), ("b", 200)):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(root / c / f"{i}.png")
    _scrambled(root / "a" / "0.png")
    ds = ImageFolderDataset(root, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    children = set(multiprocessing.active_children())
    batches = iter(loader)
    with pytest.raises(DataError) as caught:
        next(batches)
    # The epoch's two other batches, at whose end the iterator stops its worker: left running (the
    # error's traceback holds the iterator), the worker was killed at the process's exit, leaving
    # the pymp-* folder it shared its batches through in the temp folder the process started with.
    assert len(list(batches)) == 2
    assert set(multiprocessing.active_children()) <= children
    error = worker_error(caught.value)
    assert str(error).startswith(f"cannot read image {root / 'a' / '0.png'}: ")
    assert "\n" not in str(error) and str(error).endswith("remove it or pass --skip-bad-images")
    skipping = ImageFolderDataset(root, 8, skip_bad_images=True)
    x, y = skipping[0]  # its class's next image stands in, on every run
    assert y == 0 and torch.equal(x, skipping[1][0])


def test_hidden_folders_are_no_class_and_unlabelled_folders_say_why(tmp_path):
    root = _classes(tmp_path / "sub", ["cat", "dog"])
    for hidden in (".ipynb_checkpoints", "__MACOSX"):
        (root / hidden).mkdir()
        shutil.copy(root / "cat" / "0.png", root / hidden / "x.png")
    assert ImageFolderDataset(root, 8).class_names == ["cat", "dog"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("cat_0.png", "dog_0.png", "photo.png"):
        shutil.copy(root / "cat" / "0.png", flat / name)
    ds = ImageFolderDataset(flat, 8)
    assert ds.num_classes == 0 and ds.why_unlabelled == f"{flat / 'photo.png'} has no class_ prefix"
    with pytest.raises(DataError, match="photo.png has no class_ prefix"):
        fit_classifier(ClassifierConfig(), ds)
    (flat / "more").mkdir()
    shutil.copy(root / "cat" / "0.png", flat / "more" / "x.png")
    with pytest.raises(DataError, match=r"mixes class subfolders \(more/\) with loose images \(cat_0.png\)"):
        ImageFolderDataset(flat, 8)


def _both_trainers_refuse(tmp_path, root, ds, text, *extra):
    """train and train-classifier on ``root`` end in the one line ``text`` and write nothing; an
    unconditional network fits ``ds`` (it makes no class ids)."""
    args = ["--data", str(root), "--image-size", "8", "--batch-size", "2", "--max-steps", "1", *extra]
    _one_line(CliRunner().invoke(train, [*args, "--flags", TINY, "--out", str(tmp_path / "d")]), text)
    r = CliRunner().invoke(train_classifier, [*args, "--flags", CLASSIFIER, "--out", str(tmp_path / "c")])
    _one_line(r, text)
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()
    unconditional = TINY.replace("--class_cond True", "--class_cond False")
    assert fit_unet(configs_from_flags("diffusion", parse_flags(unconditional))[0], ds).num_classes is None


def test_a_class_folder_without_images_is_refused_where_it_would_shift_the_ids(tmp_path):
    """An empty class folder (or one of .bmp files) got no id without a word: the folders after
    it took the ids before theirs, kept in the weights. Training refuses it in one line, before
    any work; an unconditional run, evaluate and nearest make no ids and read the folder as it is."""
    root = _classes(tmp_path / "data", ["ant", "cat", "dog"])
    for folder in (root / "bee", root / ".cache", tmp_path / "cow"):
        folder.mkdir()
    (root / "bee" / "a.bmp").write_bytes(b"BM")
    (root / "cow").symlink_to(tmp_path / "cow")  # a linked class folder, as the listing reads them
    ds = ImageFolderDataset(root, 8)
    assert ds.class_names == ["ant", "cat", "dog"] and ds.empty_classes == ["bee", "cow"]
    text = f"class folder {root / 'bee'} (and 1 more) holds no images (.jpg, .jpeg, .png, .gif, .webp)"
    _both_trainers_refuse(tmp_path, root, ds, text)
    flat = tmp_path / "flat"  # a flat folder's classes are its names' prefixes, not its folders
    (flat / "empty").mkdir(parents=True)
    shutil.copy(root / "cat" / "0.png", flat / "cat_0.png")
    assert ImageFolderDataset(flat, 8).empty_classes == []


def test_a_class_whose_every_image_is_skipped_is_refused_as_an_empty_folder_is(tmp_path):
    """With --skip-bad-images, a class folder (or flat prefix) whose only images were corrupt
    vanished: 'ant' made 'cat' class 0 in the weights for good, and training said only how many
    images it skipped. It is refused in one line, as an empty class folder is; an unconditional
    run trains on the images it can read."""
    root = _classes(tmp_path / "data", ["ant", "cat", "dog"])
    for path in (root / "ant").iterdir():
        path.write_bytes(path.read_bytes()[:40])  # cut
    ds = ImageFolderDataset(root, 8, skip_bad_images=True)
    assert ds.unread_classes == ["ant"] and ds.class_names == ["cat", "dog"]
    text = "every image of class ant is unreadable or corrupt (--skip-bad-images skipped them)"
    _both_trainers_refuse(tmp_path, root, ds, text, "--skip-bad-images")
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("ant_0.png", "bee_0.png", "cat_0.png"):
        shutil.copy(root / "cat" / "0.png", flat / name)
    (flat / "bee_0.png").write_bytes(b"\x89PNG")
    assert ImageFolderDataset(flat, 8, skip_bad_images=True).unread_classes == ["bee"]
    assert ImageFolderDataset(root / "cat", 8, skip_bad_images=True).unread_classes == []


@pytest.mark.parametrize(
    "change, text",
    [
        (["--seed", "3"], "seed (0 in the run, 3 now)"),
        (["--batch-size", "2"], "batch size (4 in the run, 2 now)"),
        (["--microbatch", "4"], "micro-batch size (2 in the run, 4 now)"),
        (["--precision", "bf16"], "precision ('fp32' in the run, 'bf16' now)"),
        (["--ema", "0.99"], "EMA rates ((0.99, 0.9) in the run, (0.99,) now)"),
        (["--flags", TINY + " --dropout 0.1"], "flag dropout (0.0 in the run, 0.1 now)"),
    ],
)
def test_resume_refuses_other_settings_before_the_data_is_read(finished_run, tmp_path, change, text):
    _, args = _copy(finished_run, tmp_path)
    args[args.index("--data") + 1] = str(tmp_path / "nope.npz")  # any other error: it was read first
    _one_line(CliRunner().invoke(train, [*args, *change]), f"other settings: {text}")
