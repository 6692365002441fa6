"""The memorisation check: neighbours against brute force, copies flagged and fresh digits not,
its outputs, and one-line errors."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from builders import one_line_error
from click.testing import CliRunner

from fastdiff.cli.main import main
from fastdiff.evaluation.metrics import EvaluationError
from fastdiff.evaluation.nearest import NearestConfig, check_space, nearest, pixels, training_copies

pytest.importorskip("mlxtend")


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(0)
    q, bank = rng.standard_normal((37, 9)), rng.standard_normal((101, 9))
    idx, dist = nearest(q, bank, 3, NearestConfig(batch_size=10))
    full = np.sqrt(((q[:, None] - bank[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx, np.argsort(full, 1)[:, :3])
    np.testing.assert_allclose(dist, np.sort(full, 1)[:, :3], rtol=1e-9, atol=1e-9)
    img = rng.integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    rms = np.sqrt((((img[0].astype(float) - img[1]) / 255) ** 2).mean())
    assert np.linalg.norm(pixels(img)[0] - pixels(img)[1]) == pytest.approx(rms, rel=1e-12)


def test_threshold_is_the_heldout_quantile():
    rng = np.random.default_rng(1)
    train, held = rng.standard_normal((200, 4)), rng.standard_normal((100, 4))
    samples = np.concatenate([train[:5] + 1e-6, rng.standard_normal((20, 4))])
    res = check_space(samples, train, held, NearestConfig(quantile=0.05))
    assert res.threshold == pytest.approx(np.quantile(res.heldout_distance, 0.05))
    assert res.flagged[:5].all() and res.flagged[5:].mean() < 0.3
    with pytest.raises(EvaluationError, match="quantile"):
        NearestConfig(quantile=1.5)


def test_exact_copies_are_at_distance_zero_and_flagged():
    """The expanded form's rounding put copies of large vectors a little above 0; a held-out set
    holding training images (distance exactly 0) would then flag none of them."""
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    held = np.concatenate([rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), train[:3]])
    config = NearestConfig(quantile=0.5, batch_size=7)
    _, dist = nearest(pixels(train[10:30]), pixels(train), 2, config)
    assert (dist[:, 0] == 0).all() and (dist[:, 1] > 0).all()
    copies = training_copies(held, train, config)
    assert copies.tolist() == [False] * 20 + [True] * 3
    res = check_space(pixels(train[10:30]), pixels(train), pixels(held[~copies]), config)
    assert res.threshold > 0 and res.flagged.all()


def test_pixel_vectors_are_made_one_query_batch_at_a_time():
    """The samples' pixels are compared as float64, 8 bytes a pixel; check_space(rows=pixels)
    makes them per query batch, with the same neighbours (nearest held them all: 4.9 GB for
    50,000 64x64 samples, eight times the samples themselves)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256, (2000, 8, 8, 3), dtype=np.uint8)
    train, held = samples[:5].copy(), rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    config = NearestConfig(batch_size=64)
    whole = check_space(pixels(samples), pixels(train), pixels(held), config)
    tracemalloc.start()
    try:
        batched = check_space(samples, train, held, config, rows=pixels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(batched.sample_index, whole.sample_index)
    assert np.array_equal(batched.sample_distance, whole.sample_distance)
    assert np.array_equal(batched.heldout_distance, whole.heldout_distance)
    assert peak < pixels(samples).nbytes / 4


def test_distance_plot_of_equal_distances_warns_nothing(tmp_path):
    """Every distance equal (the samples copies of one image): one visible bar per set, no
    zero-width bins (numpy's and matplotlib's warnings on stderr, NaN bars)."""
    import warnings

    from fastdiff.cli.nearest import distance_plot
    from fastdiff.evaluation.nearest import MemorisationReport, SpaceResult

    # pyplot imported before the check: matplotlib 3.7's own import warns under pyparsing 3.3
    pytest.importorskip("matplotlib.pyplot")
    space = SpaceResult(np.zeros((3, 1), int), np.ones((3, 1)), np.ones(4), 1.0)
    report = MemorisationReport(space, space, "mnist", 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distance_plot(report, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0


def test_cli_flags_copies_not_fresh_digits(tmp_path):
    from fastdiff.training.data import get_mnist

    train, val = get_mnist("train"), get_mnist("val")
    rng = np.random.default_rng(0)
    copies = train.images[rng.permutation(len(train.images))[:8]]
    fresh = val.images[rng.permutation(len(val.images))[:40]]  # never trained on, like good samples
    np.savez(tmp_path / "s.npz", np.concatenate([copies, fresh]))
    out = tmp_path / "nn"
    r = CliRunner().invoke(
        main,
        [
            "nearest",
            str(tmp_path / "s.npz"),
            "--data",
            "mnist",
            "--out",
            str(out),
            "--no-progress",
            "--show",
            "6",
        ],
    )
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "nearest.json").read_text())
    flagged = {f["sample"] for f in rec["flagged"]}
    assert set(range(8)) <= flagged and len(flagged - set(range(8))) <= 4
    assert rec["num_heldout"] == 500 and rec["features"]["threshold"] > 0
    with np.load(out / "nearest.npz") as z:
        assert z["feature_index"].shape == (48, 3) and (z["pixel_distance"][:8, 0] < 1e-6).all()
    assert (out / "nearest.png").is_file() and "Flagged: " in r.output
    from PIL import Image

    with Image.open(out / "nearest.png") as im:  # 6 rows of sample + 3 + 3 neighbours
        assert im.size == (7 * 34 + 2, 6 * 34 + 2)


def test_cli_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8))
    np.savez(tmp_path / "train.npz", rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8))
    np.savez(tmp_path / "train64.npz", rng.integers(0, 256, (8, 64, 64, 1), dtype=np.uint8))

    def run(*args):
        return CliRunner().invoke(
            main, ["nearest", "--no-progress", "--out", tmp_path / "o", *map(str, args)]
        )

    one_line_error(run(tmp_path / "s.npz", "--data", tmp_path / "train.npz"), "--held-out")
    one_line_error(
        run(tmp_path / "s.npz", "--data", tmp_path / "train64.npz", "--held-out", tmp_path / "train.npz"),
        "64x64",
    )
    one_line_error(run(tmp_path / "s.npz", "--data", "mnist", "--quantile", "0"), "quantile")
    one_line_error(run(tmp_path / "missing.npz", "--data", "mnist"), "not found")
    same = ["--data", tmp_path / "train.npz", "--held-out", tmp_path / "train.npz"]
    one_line_error(run(tmp_path / "s.npz", *same), "holds 0 image(s) that are not training images")
    assert not (tmp_path / "o").exists()  # the locked --out made for them is gone again


def test_cli_grid_rows_when_k_exceeds_the_training_images(tmp_path):
    """--k 8 with 5 training images: each row is the sample and 5 + 5 neighbours, not 1 + 2 * 8 columns."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in (("s", 4), ("train", 5), ("held", 6)):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8))
    r = CliRunner().invoke(
        main,
        ["nearest", "--no-progress", "--out", str(tmp_path / "o"), "--k", "8", str(tmp_path / "s.npz")]
        + ["--data", str(tmp_path / "train.npz"), "--held-out", str(tmp_path / "held.npz")],
    )
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "o" / "nearest.png") as im:
        assert im.size == (11 * 34 + 2, 4 * 34 + 2)


def test_cli_refuses_out_and_network_before_any_distance(tmp_path, monkeypatch):
    """An --out that cannot be written, and samples the feature network cannot score, are one
    line before the held-out copies are searched and features computed (--out was found after)."""

    def refuse(*args, **kwargs):
        raise AssertionError("distances computed before the input was refused")

    monkeypatch.setattr("fastdiff.evaluation.nearest.nearest", refuse)
    # patched where the CLI looks it up: runs.features binds it at import, so patching networks'
    # name made a worker's first import of runs.features keep the refusal for its later tests
    monkeypatch.setattr("fastdiff.runs.features.compute_activations", refuse)
    rng = np.random.default_rng(0)
    for name, c in (("s", 1), ("train", 1), ("held", 1), ("rgb", 3), ("rgb_train", 3)):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (6, 32, 32, c), dtype=np.uint8))
    (tmp_path / "afile").write_text("")
    data = ["--data", tmp_path / "train.npz", "--held-out", tmp_path / "held.npz"]

    def run(*args):
        return CliRunner().invoke(main, ["nearest", "--no-progress", *map(str, args)])

    one_line_error(
        run("--out", tmp_path / "afile" / "o", tmp_path / "s.npz", *data), "--out", "Not a directory"
    )
    rgb = ["--data", tmp_path / "rgb_train.npz", "--held-out", tmp_path / "rgb_train.npz"]
    one_line_error(
        run("--out", tmp_path / "o", "--features", "mnist", tmp_path / "rgb.npz", *rgb), "MNIST CNN"
    )


def test_cli_data_npz_claiming_more_images_than_memory_is_one_line(tmp_path):
    """An arr_0 header claiming 10**12 images was numpy's MemoryError traceback in --data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 32, 32, 1)}
    )
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("arr_0.npy", buf.getvalue() + bytes(32 * 32))
    np.savez(tmp_path / "s.npz", np.zeros((4, 32, 32, 1), np.uint8))
    r = CliRunner().invoke(
        main,
        ["nearest", "--no-progress", "--out", str(tmp_path / "o"), str(tmp_path / "s.npz")]
        + ["--data", str(tmp_path / "huge.npz"), "--held-out", str(tmp_path / "s.npz")],
    )
    one_line_error(r, "cannot read", "huge.npz")


def test_cli_holds_its_out_folder_and_clears_its_killed_temporaries(tmp_path):
    """fastdiff nearest locks --out (the folder itself, so a folder of the user's other files is
    fine and keeps no .lock): a second run into it is one line before any feature, and a killed
    run's temporary file goes (nothing removed either), another writer's stays."""
    from fastdiff.files import locked_folder

    rng = np.random.default_rng(0)
    for name, n in (("s", 4), ("train", 5), ("held", 6)):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8))
    out = tmp_path / "shared"
    out.mkdir()
    others = [out / "notes.txt", out / ".grid.png.abcd1234.png"]  # the user's, another writer's
    for p in [*others, out / ".nearest.json.abcd1234.json"]:
        p.write_bytes(b"")
    args = ["nearest", "--no-progress", "--out", str(out), str(tmp_path / "s.npz")]
    args += ["--data", str(tmp_path / "train.npz"), "--held-out", str(tmp_path / "held.npz")]
    with locked_folder(out):
        one_line_error(CliRunner().invoke(main, args), "is in use by another fastdiff process")
    assert len(list(out.iterdir())) == 3
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    written = {p.name for p in out.iterdir() if p not in others} - {"distances.png"}  # with matplotlib
    assert written == {"nearest.json", "nearest.npz", "nearest.png"}
