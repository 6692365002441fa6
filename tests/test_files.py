"""fastdiff.files: reading images in a model's channels; the npz writers (whole arrays, and streamed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastdiff.files import in_channels, is_temp_file, npz_stream, save_npz, save_npz_streamed


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_reads_as_its_8_bit_image(tmp_path, channels):
    """PIL's convert clipped 16-bit greyscale to 255: fastdiff invert read a 16-bit PNG as white."""
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I;16")
        got = np.asarray(in_channels(img, channels))
    assert got.shape == ((16, 16) if channels == 1 else (16, 16, 3))
    np.testing.assert_array_equal(got if channels == 1 else got[..., 0], pixels)


def test_8_bit_images_convert_as_pil_does():
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 4), dtype=np.uint8))
    assert np.array_equal(np.asarray(in_channels(rgba, 1)), np.asarray(rgba.convert("L")))
    assert np.array_equal(np.asarray(in_channels(rgba, 3)), np.asarray(rgba.convert("RGB")))


def test_save_npz_writes_positional_then_named_arrays_and_drops_a_trailing_none(tmp_path):
    """One writer serves the sample batches (labels or None), invert's latents.npz (labels and
    named settings) and nearest.npz (named only); each had its own temp-file writer before."""
    images, labels = np.zeros((2, 4, 4, 3), np.uint8), np.array([3, 5])
    save_npz(tmp_path / "a.npz", images, None)
    save_npz(tmp_path / "b.npz", images, labels, respacing=np.array("ddim5"))
    save_npz(tmp_path / "c.npz", index=labels)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b, np.load(tmp_path / "c.npz") as c:
        assert (
            a.files == ["arr_0"]
            and sorted(b.files) == ["arr_0", "arr_1", "respacing"]
            and c.files == ["index"]
        )
        assert np.array_equal(b["arr_1"], labels) and str(b["respacing"]) == "ddim5"
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p)]


def test_save_npz_streamed_writes_what_np_savez_writes(tmp_path):
    """A run's final npz is streamed chunk by chunk (one batch in memory, not 2x the run); it is
    np.savez's file byte for byte, so np.load and the evaluator's zip-streaming reader take it."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8), np.arange(7, dtype=np.int64)
    members = [
        ("arr_0", images.shape, np.uint8, [images[:3], images[3:3], images[3:6], images[6:]]),
        ("arr_1", labels.shape, np.int64, (labels[i : i + 2] for i in range(0, 7, 2))),
    ]
    save_npz_streamed(tmp_path / "streamed.npz", members)
    save_npz(tmp_path / "whole.npz", images, labels)
    assert (tmp_path / "streamed.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    with pytest.raises(ValueError, match="chunks of 3 rows"):
        save_npz_streamed(tmp_path / "short.npz", [("arr_0", images.shape, np.uint8, [images[:3]])])


def test_an_npz_stream_takes_whole_members_beside_chunked_ones(tmp_path):
    """invert's latents.npz: its settings and labels whole, around latents written as each batch
    is made (a push, not save_npz_streamed's pull from iterables); np.savez's file byte for byte,
    and an unfinished member leaves no file."""
    rng = np.random.default_rng(0)
    latents, labels = rng.standard_normal((5, 1, 4, 4), dtype=np.float32), np.array([3, 1, 4, 1, 5])
    with npz_stream(tmp_path / "streamed.npz") as npz:
        npz.add("respacing", np.array("ddim10"))
        npz.add("cfg_scale", np.array(2.5))
        with npz.member("arr_0", latents.shape, np.float32) as write:
            for lo in range(0, 5, 2):
                write(latents[lo : lo + 2])
        npz.add("arr_1", labels)
    save_npz(tmp_path / "whole.npz", latents, labels, respacing=np.array("ddim10"), cfg_scale=np.array(2.5))
    assert (tmp_path / "streamed.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    with pytest.raises(ValueError, match="a float64 chunk"):
        with npz_stream(tmp_path / "bad.npz") as npz, npz.member("arr_0", latents.shape, np.float32) as write:
            write(latents[:2].astype(np.float64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.npz", "whole.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.npz", "whole.npz"]


def test_an_npz_s_images_read_by_range_as_np_load_reads_them(tmp_path):
    """Upsampling reads its low-res npz a batch at a time (it held all of it, 2.4 GB for 50,000
    128-px images): a stored npz, as np.savez and the streamed writer make, is read at an offset
    without loading the rest; a compressed one cannot be, and is loaded whole instead."""
    from fastdiff.evaluation.npz import read_npz

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "saved.npz", images, np.arange(9))
    save_npz_streamed(
        tmp_path / "streamed.npz", [("arr_0", images.shape, np.uint8, [images[:5], images[5:]])]
    )
    np.savez(tmp_path / "gray.npz", images[..., 0])  # N x H x W: one channel
    np.savez_compressed(tmp_path / "compressed.npz", images)
    for name in ("saved", "streamed", "gray", "compressed"):
        batch = read_npz(tmp_path / f"{name}.npz")
        assert (batch._offset is None) == (name == "compressed"), name
        want = images[..., :1] if name == "gray" else images
        for lo, hi in ((0, 9), (2, 5), (8, 9), (4, 4)):
            got = batch.take(lo, hi)
            assert got.flags.writeable and np.array_equal(got, want[lo:hi]), (name, lo, hi)


def test_remove_temp_files_takes_our_temp_folders_and_only_those_asked_for(tmp_path):
    """A killed side-file export leaves its temporary folder (``.NAME.xxxxxxxx`` holding NAME and
    NAME.data); clean-up removes it as it removes temporary files (it took files only), but never
    a folder named alike holding anything else, and with ``names`` only the temporaries of those."""
    from fastdiff.files import remove_temp_files, temp_folder

    graph = tmp_path / "g.onnx"
    killed = temp_folder(graph)
    (killed / "g.onnx").write_bytes(b"half")
    (killed / "g.onnx.data").write_bytes(b"half")
    empty = temp_folder(graph)  # killed before anything was written
    other = temp_folder(tmp_path / "h.onnx")
    user = tmp_path / ".g.onnx.photos12"  # our name pattern, a user's contents
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"")
    tmp_file = tmp_path / ".h.onnx.abcd1234.onnx"
    tmp_file.write_bytes(b"")
    assert remove_temp_files(tmp_path, ["g.onnx"]) == 2
    assert not killed.exists() and not empty.exists() and other.is_dir() and tmp_file.exists()
    assert remove_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [user.name]
    assert (user / "holiday.jpg").exists()


def test_locked_folder_runs_unlocked_where_the_filesystem_cannot_lock_a_folder(tmp_path, monkeypatch):
    """NFS cannot flock a folder's read-only descriptor (EBADF): the command runs unlocked, as it
    did before folders were locked, instead of failing; a held lock is still BlockingIOError."""
    import errno
    import fcntl

    from fastdiff.files import locked_folder

    with locked_folder(tmp_path), pytest.raises(BlockingIOError), locked_folder(tmp_path):
        pass

    def nfs(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", nfs)
    ran = []
    with locked_folder(tmp_path / "new"):
        ran.append(True)
    assert ran and (tmp_path / "new").is_dir()


def test_a_waiting_lock_says_so_then_waits_for_the_holder(tmp_path, capfd):
    """locked_folder(wait=LINE) prints LINE when another holder has the folder, then blocks until
    it is free (the ONNX cache's lock waited without a word, which looked like a hang)."""
    import threading

    from fastdiff.files import locked_folder

    order = []

    def waiter():
        with locked_folder(tmp_path, wait="waiting for the holder"):
            order.append("waiter")

    with locked_folder(tmp_path, wait="not printed: the folder is free"):
        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # blocked behind the holder
        order.append("holder done")
    thread.join(10)
    assert order == ["holder done", "waiter"]
    assert capfd.readouterr().err == "waiting for the holder\n"
