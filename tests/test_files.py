"""fastdiff.files: reading images in a model's channels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastdiff.files import in_channels


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
