"""slerp and `fastdiff interpolate`.

Oracles: `fastdiff sample`'s images of the same seeds (a strip's ends), and the reconstructions
`fastdiff invert` made of the latents it wrote.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import build_unet, cli
from PIL import Image

import fastdiff
from fastdiff.diffusion.inversion import slerp


def test_slerp():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    # orthogonal unit vectors: the midpoint stays on the sphere (a line would shrink it by sqrt 2)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(e1, e2, 0.5)
    assert torch.allclose(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    assert torch.allclose(slerp(e1, 2 * e1, 0.5), 1.5 * e1)  # parallel: the straight line
    assert torch.allclose(slerp(0 * e1, e2, 0.25), 0.25 * e2)  # no angle to a zero latent: the line


def _tiles(path, n, size=32, pad=2):
    strip = np.asarray(Image.open(path))
    return [strip[pad : pad + size, pad + k * (size + pad) : pad + k * (size + pad) + size] for k in range(n)]


def test_interpolation_ends_are_the_seeds_samples(inverted, tmp_path):
    d, _, _ = inverted
    ends = []
    for seed in (5, 6):  # image 0 of a batch of two: x_T is the batch generator's first draw
        r = cli("sample", "--no-progress", "--num-samples", 2, "--classes", 7, "--steps", 4,
                "--classifier-scale", 0, "--seed", seed, "--out", tmp_path / f"s{seed}")  # fmt: skip
        assert r.exit_code == 0, r.output
        ends.append(np.asarray(Image.open(tmp_path / f"s{seed}" / "images" / "000000_class7.png")))
    r = cli("interpolate", "--from", 5, "--to", 6, "--class", 7, "--frames", 3, "--steps", 4,
            "--out", tmp_path / "strip.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    tiles = _tiles(tmp_path / "strip.png", 3)
    assert np.array_equal(tiles[0], ends[0]) and np.array_equal(tiles[2], ends[1])
    assert not np.array_equal(tiles[1], tiles[0]) and not np.array_equal(tiles[1], tiles[2])
    # from inverted latents: the first end is image 0's reconstruction (its class, 3, for all)
    latents = d / "inv" / "latents.npz"
    r = cli("interpolate", "--from", f"{latents}:0", "--to", f"{latents}:1", "--frames", 2, "--steps", 10,
            "--out", tmp_path / "inv.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    recon = np.asarray(Image.open(d / "inv" / "reconstructed" / "000000.png"))
    assert np.array_equal(_tiles(tmp_path / "inv.png", 2)[0], recon)
    # without --steps: the steps the latents were inverted with (10), not the default (25)
    r = cli("interpolate", "--from", f"{latents}:0", "--to", f"{latents}:1", "--frames", 2,
            "--out", tmp_path / "stored.png")  # fmt: skip
    assert r.exit_code == 0 and "(10 DDIM steps)" in r.output, r.output
    assert np.array_equal(_tiles(tmp_path / "stored.png", 2)[0], recon)


def test_interpolate_refuses_latents_inverted_with_different_steps(tmp_path):
    for name, respacing in (("a", "ddim10"), ("b", "ddim20")):
        latents = np.zeros((1, 1, 32, 32), np.float32)
        np.savez(tmp_path / f"{name}.npz", latents, np.array([3]), respacing=np.array(respacing))
    r = cli(
        "interpolate", "--from", tmp_path / "a.npz", "--to", tmp_path / "b.npz", "--out", tmp_path / "s.png"
    )
    assert r.exit_code == 1 and "inverted with different steps (ddim10, ddim20)" in r.output, r.output


def test_interpolate_guides_inverted_latents_as_they_were_inverted(tmp_path):
    """latents.npz keeps invert's --cfg-scale as it keeps its steps: without it the strip's end
    was sampled unguided, 66 grey levels off the reconstruction of an image inverted with w=2."""
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    r = cli("invert", tmp_path / "img.png", "--classes", 3, "--steps", 2, "--cfg-scale", 2,
            "--out", tmp_path / "inv")  # fmt: skip
    assert r.exit_code == 0, r.output
    latents = tmp_path / "inv" / "latents.npz"
    r = cli("interpolate", "--from", latents, "--to", 0, "--frames", 2, "--out", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    recon = np.asarray(Image.open(tmp_path / "inv" / "reconstructed" / "000000.png"))
    assert np.array_equal(_tiles(tmp_path / "s.png", 2)[0], recon)
    for name, cfg_scale in (("a", 1.0), ("b", 3.0)):
        np.savez(tmp_path / f"{name}.npz", np.zeros((1, 1, 32, 32), np.float32), np.array([3]),
                 respacing=np.array("ddim2"), cfg_scale=np.array(cfg_scale))  # fmt: skip
    r = cli(
        "interpolate", "--from", tmp_path / "a.npz", "--to", tmp_path / "b.npz", "--out", tmp_path / "t.png"
    )
    assert r.exit_code == 1 and "inverted with different --cfg-scale (1.0, 3.0)" in r.output, r.output


def test_a_latents_file_name_may_hold_colons(tmp_path):
    """LATENTS.npz:INDEX was split at the first colon: 'run:1/latents.npz:1' was an unreadable index."""
    from fastdiff.runs.interpolation import _latents_spec

    (tmp_path / "run:1").mkdir()
    spec = str(tmp_path / "run:1" / "latents.npz")
    np.savez(spec, np.zeros((2, 1, 32, 32), np.float32))
    assert _latents_spec(f"{spec}:1") == (spec, "1") and _latents_spec(spec) == (spec, "")
    assert _latents_spec("a.npz") == ("a.npz", "") and _latents_spec("12") is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["interpolate", "--from", 0, "--to", 1, "--out", "{tmp}/s.png"], "pass --class K"),
        (
            ["interpolate", "--from", 0, "--to", "nope.npz", "--class", 1, "--out", "{tmp}/s.png"],
            "--to 'nope.npz' is neither a seed nor a latents file (nope.npz not found)",  # which option
        ),
        (
            ["interpolate", "--from", 0, "--to", "{bad}", "--class", 1, "--out", "{tmp}/s.png"],
            "this model's are float32 [1, 32, 32]",
        ),
        (["interpolate", "--from", 0, "--to", 1, "--class", 1, "--out", "{tmp}/s.jpg"], "name it .png"),
        (
            ["interpolate", "--from", 0, "--to", "{img}", "--class", 1, "--out", "{tmp}/s.png"],
            "not an npz of arrays",
        ),
        (["interpolate", "--from", 0, "--to", 1, "--class", 1, "--out", "{img}/s.png"], "Not a directory"),
        (
            ["interpolate", "--from", 0, "--to", 1, "--class", 1, "--out", "{dir}"],
            "is a folder; name the strip's",
        ),
        # were numpy's and zipfile's tracebacks
        (["interpolate", "--from", "{latents}", "--to", 1, "--out", "{tmp}/s.png"], "not an npz of arrays"),
        (["interpolate", "--from", "{cut}", "--to", 1, "--out", "{tmp}/s.png"], "cannot read latents"),
        (["interpolate", "--from", "{crc}", "--to", 1, "--out", "{tmp}/s.png"], "Bad CRC-32"),
        # were the SamplingError's traceback, and a stored label's IndexError / ValueError
        (["interpolate", "--from", "{nan}", "--to", 1, "--out", "{tmp}/s.png"], "latent 0 holds NaN"),
        (
            ["interpolate", "--from", "{huge}", "--to", 1, "--steps", 2, "--frames", 2]
            + ["--out", "{tmp}/s.png"],
            "frames 0-1: non-finite values at sampling step 1/2",
        ),
        (
            ["interpolate", "--from", "{labels}:1", "--to", 1, "--out", "{tmp}/s.png"],
            "arr_1 must hold one integer class per latent (2), got int64 of shape [1]",
        ),
        (
            ["interpolate", "--from", "{named}", "--to", 1, "--out", "{tmp}/s.png"],
            "arr_1 must hold one integer class per latent (2), got <U1 of shape [2]",
        ),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    np.savez(tmp_path / "bad.npz", np.zeros((1, 3, 32, 32), np.float32))
    (tmp_path / "dir.png").mkdir()
    latent = np.zeros((2, 1, 32, 32), np.float32)
    np.savez(tmp_path / "nan.npz", latent + np.nan, np.array([1, 2]))
    np.savez(tmp_path / "huge.npz", latent + 3e38, np.array([1, 2]))
    np.savez(tmp_path / "labels.npz", latent, np.array([1]))
    np.savez(tmp_path / "named.npz", latent, np.array(["a", "b"]))
    np.save(tmp_path / "latents.npy", latent)
    whole = (tmp_path / "labels.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "crc.npz").write_bytes(whole[:1000] + b"x" * 100 + whole[1100:])
    files = ["img.png", "bad.npz", "dir.png", "nan.npz", "huge.npz", "labels.npz", "named.npz"]
    files += ["latents.npy", "cut.npz", "crc.npz"]
    names = {f.split(".")[0]: tmp_path / f for f in files}
    r = cli(*[str(a).format(tmp=tmp_path, **names) for a in args])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["interpolate", "--from", -5, "--to", 1, "--class", 1, "--out", "{tmp}/s.png"],
            "--from's seed must",
        ),
        (
            ["interpolate", "--from", 0, "--to", 1, "--class", 1, "--cfg-scale", "inf"]
            + ["--out", "{tmp}/s.png"],
            "--cfg-scale must be a finite number, got inf",
        ),
    ],
)
def test_a_value_out_of_its_options_range_exits_2(tmp_path, args, message):
    """As click's own range checks (these exited 1)."""
    r = cli(*[str(a).format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and message in r.output, r.output
    assert not (tmp_path / "s.png").exists()


def test_interpolate_uses_a_stored_label_only_where_the_model_takes_one(tmp_path):
    """Latents fastdiff invert wrote for a class-conditional model carry labels: an unconditional
    model of the same shape ignores them, and the bundled model names a stored class it lacks as
    the latents' (the user gave no --class)."""
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="", in_channels=1, diffusion_steps=100)  # fmt: skip
    fastdiff.models.checkpoint.save_weights(
        build_unet(**flags), tmp_path / "uncond.safetensors", {"flags": flags}
    )
    latents = np.random.default_rng(0).standard_normal((2, 1, 32, 32), np.float32)
    np.savez(tmp_path / "latents.npz", latents, np.array([3, 12]))
    ends = ("--from", f"{tmp_path / 'latents.npz'}:1", "--to", 0, "--frames", 2, "--steps", 2)
    r = cli(
        "interpolate", *ends, "--checkpoint", tmp_path / "uncond.safetensors", "--out", tmp_path / "u.png"
    )
    assert r.exit_code == 0, r.output
    r = cli("interpolate", *ends, "--out", tmp_path / "c.png")
    assert r.exit_code == 1 and "latents.npz:1's stored class 12 out of range" in r.output, r.output
    assert "--class given" not in r.output and not (tmp_path / "c.png").exists()


def test_interpolate_takes_a_class_name(tmp_path, named_model):
    """--class takes a class name the weights keep; another name is one line that lists them."""
    latents = tmp_path / "latents.npz"
    z = np.random.default_rng(0).standard_normal((2, 1, 8, 8), np.float32)
    np.savez(latents, z, np.array([0, 1]), respacing=np.array("ddim2"))  # as invert --steps 2 writes
    ends = ("--from", latents, "--to", f"{latents}:1", "--frames", 2, "--checkpoint", named_model)
    r = cli("interpolate", *ends, "--class", "dog", "--out", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    r = cli("interpolate", *ends, "--class", "bird", "--out", tmp_path / "t.png")
    assert r.exit_code == 1 and "the model's class names (cat, dog)" in r.output, r.output
    assert not (tmp_path / "t.png").exists()


def test_interpolate_draws_a_bar_of_its_ddim_steps_that_no_progress_hides(tmp_path, named_model):
    """interpolate had no --progress (a usage error for a script passing --no-progress to every
    command) and drew no bar. Now it counts each batch's steps: 3 frames in batches of 2, 2 steps."""
    args = ["interpolate", "--from", 0, "--to", 1, "--frames", 3, "--batch-size", 2, "--steps", 2]
    args += ["--checkpoint", named_model, "--class", "cat"]
    r = cli(*args, "--out", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    assert "interpolating: 100%" in r.stderr and "4/4 [" in r.stderr and "interpolating" not in r.stdout
    r = cli(*args, "--out", tmp_path / "b.png", "--no-progress")
    assert r.exit_code == 0 and "interpolating" not in r.output, r.output


def test_interpolate_in_emulated_bf16_says_so_as_its_steps_start(tmp_path, named_model, monkeypatch):
    """The DDIM runs (interpolate, invert) note an emulated bf16 as sampling runs do, once."""
    from fastdiff.runs import device

    monkeypatch.setattr(device, "emulated_bf16", lambda dev: True)
    args = ["interpolate", "--from", 0, "--to", 1, "--frames", 2, "--steps", 2, "--dtype", "bf16"]
    r = cli(*args, "--checkpoint", named_model, "--class", "cat", "--out", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("no native bf16") == 1 and "--dtype bf16" in r.stderr
