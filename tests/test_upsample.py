"""Super-resolution: ADM-U through fastdiff.Sampler (every CPU engine) and `fastdiff upsample`.

There are no super-resolution cases in ../shared/vectors, so the oracle is the reference loop
``fastdiff.diffusion.sample`` with ``low_res`` in its model_kwargs (the semantics of
super_res_sample.py's p_sample_loop call), on tiny random upsamplers. The compile engine's cold
compile took 3 minutes on the CPU, so it and graph are checked on CUDA only (tests marked gpu).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_superres, diffusion_from_flags
from click.testing import CliRunner

import fastdiff
from fastdiff.cli.main import main
from fastdiff.diffusion import sample
from fastdiff.models.checkpoint import save_weights
from fastdiff.runs.sampling import batch_generator
from fastdiff.runs.upsample import names_upsampler, parse_upsampler_spec

SR_FLAGS = dict(
    large_size=16,
    small_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_head_channels=32,
    class_cond=True,
    num_classes=4,
    learn_sigma=True,
    diffusion_steps=100,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
FLAG_STRING = " ".join(f"--{k} {v}" for k, v in SR_FLAGS.items())


def _upsampler(seed=0):
    torch.manual_seed(seed)
    model = build_superres(**SR_FLAGS)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output convs would hide the conditioning
            p.normal_(0, 0.05)
    return model.eval()


def _low_res(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _scaled(images: np.ndarray) -> torch.Tensor:
    """super_res_sample.py's scaling, written out independently of fastdiff.runs.upsample."""
    return torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1.0


def _reference(model, diffusion, sampler, low_res, labels, generator):
    return sample(
        diffusion,
        copy.deepcopy(model),
        (len(labels), 3, 16, 16),
        sampler=sampler,
        model_kwargs={"y": labels, "low_res": low_res},
        generator=generator,
    )


@pytest.mark.parametrize("engine, sampler", [("eager", "ddpm"), ("parallel", "ddim")])
def test_sampler_upsamples_as_the_reference_loop(engine, sampler):
    """Two batches through one cached step: the second's low_res and labels refill its buffers."""
    model = _upsampler()
    flags = {**SR_FLAGS, "timestep_respacing": "5" if sampler == "ddpm" else "ddim5"}
    diffusion = diffusion_from_flags(flags)
    s = fastdiff.Sampler(copy.deepcopy(model), diffusion, sampler=sampler, engine=engine)
    assert s.image_shape == (3, 16, 16)  # x's channels, not the first conv's 6
    before = torch.get_num_threads()
    for seed in (1, 2):
        low, labels = _scaled(_low_res(3, seed)), torch.tensor([seed, 0, 3])
        torch.set_num_threads(2 if engine == "parallel" else before)  # the engine's workers
        try:
            got = s(labels, generator=torch.Generator().manual_seed(seed), model_kwargs={"low_res": low})
        finally:
            torch.set_num_threads(before)
        want = _reference(model, diffusion, sampler, low, labels, torch.Generator().manual_seed(seed))
        if engine == "eager":
            assert torch.equal(got, want)
        else:  # other batch slices: convolution sums may round differently
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    # the low-res image matters: another one gives another sample from the same noise
    other = s(labels, generator=torch.Generator().manual_seed(2), model_kwargs={"low_res": -low})
    assert not torch.allclose(other, got)


def _engine_upsamples_as_eager(engine, device):
    model = _upsampler().to(device)
    diffusion = diffusion_from_flags({**SR_FLAGS, "timestep_respacing": "ddim4"})
    eager = fastdiff.Sampler(copy.deepcopy(model), diffusion, engine="eager", device=device)
    fast = fastdiff.Sampler(copy.deepcopy(model), diffusion, engine=engine, device=device)
    for seed in (1, 2):  # the second batch refills the compiled or captured step's buffers
        low = _scaled(_low_res(3, seed)).to(device)
        labels = torch.tensor([seed, 0, 3], device=device)
        kw = {"model_kwargs": {"low_res": low}}
        want = eager(labels, generator=torch.Generator(device).manual_seed(seed), **kw)
        got = fast(labels, generator=torch.Generator(device).manual_seed(seed), **kw)
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4, (engine, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["graph", "compile"])
def test_gpu_engines_upsample_as_eager(engine, no_tf32):
    _engine_upsamples_as_eager(engine, "cuda")


def test_sampler_model_kwargs_errors():
    s = fastdiff.Sampler(_upsampler(), diffusion_from_flags({**SR_FLAGS, "timestep_respacing": "2"}))
    with pytest.raises(ValueError, match="one row per image"):
        s(torch.tensor([0, 1]), model_kwargs={"low_res": torch.zeros(3, 3, 8, 8)})
    with pytest.raises(ValueError, match="as labels"):
        s(torch.tensor([0]), model_kwargs={"y": torch.tensor([0]), "low_res": torch.zeros(1, 3, 8, 8)})


def test_bf16_casts_the_conditioning():
    """A low-precision network gets low_res in its dtype (else the first conv sees mixed inputs)."""
    model = _upsampler()
    diffusion = diffusion_from_flags({**SR_FLAGS, "timestep_respacing": "ddim3"})
    low, labels = _scaled(_low_res(2)), torch.tensor([1, 2])
    ref = fastdiff.Sampler(copy.deepcopy(model), diffusion, engine="eager")
    bf16 = fastdiff.Sampler(copy.deepcopy(model), diffusion, engine="eager", dtype="bf16")
    want = ref(labels, generator=torch.Generator().manual_seed(0), model_kwargs={"low_res": low})
    got = bf16(labels, generator=torch.Generator().manual_seed(0), model_kwargs={"low_res": low})
    assert ((got - want) ** 2).mean().item() < 1e-2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sr")
    model = _upsampler()
    torch.save(model.state_dict(), d / "sr.pt")
    save_weights(model, d / "sr.safetensors", {"flags": SR_FLAGS})
    np.savez(d / "low.npz", _low_res(5), np.array([0, 1, 2, 3, 1]))
    np.savez(d / "unlabelled.npz", _low_res(5))
    np.savez(d / "short_labels.npz", _low_res(5), np.array([0, 1, 2]))
    np.savez(d / "big.npz", np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 1]))
    (d / "folder.npz").mkdir()
    return d


def upsample(*args):
    return CliRunner().invoke(main, ["upsample", "--no-progress", "--device", "cpu", *map(str, args)])


def test_cli_upsample_writes_the_reference_samples_and_resumes(files, tmp_path):
    out = tmp_path / "run"
    common = ("--low-res", files / "low.npz", "--steps", 4, "--batch-size", 2, "--seed", 3, "--out", out)
    r = upsample("--flags", FLAG_STRING, "--checkpoint", files / "sr.pt", "--engine", "eager", *common)
    assert r.exit_code == 0, r.output
    with np.load(out / "samples_5x16x16x3.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert labels.tolist() == [0, 1, 2, 3, 1]  # carried over from the low-res npz
    assert sorted(p.name for p in (out / "images").iterdir())[0] == "000000_class0.png"
    # the reference loop, batch by batch, with the command's per-batch generators
    model = _upsampler()
    diffusion = diffusion_from_flags({**SR_FLAGS, "timestep_respacing": "4"})
    low = _scaled(_low_res(5))
    for b, lo in enumerate(range(0, 5, 2)):
        hi = min(lo + 2, 5)
        g = batch_generator(torch.device("cpu"), 3, b)
        want = _reference(model, diffusion, "ddpm", low[lo:hi], torch.tensor(labels[lo:hi]), g)
        want = ((want + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(images[lo:hi], want), b

    # a killed run that lost its last batch: --resume remakes only that batch, the same images
    (out / "batches" / "batch_00002.npz").unlink()
    (out / "samples_5x16x16x3.npz").unlink()
    r = upsample("--flags", FLAG_STRING, "--checkpoint", files / "sr.pt", *common, "--resume")
    assert r.exit_code == 0, r.output
    assert "1 images (4 already there)" in r.output  # the default (parallel/eager) engine resumes
    with np.load(out / "samples_5x16x16x3.npz") as z:
        assert np.array_equal(z["arr_0"], images)
    # another low-res file is another run
    np.savez(tmp_path / "other.npz", _low_res(5, seed=9), np.array([0, 1, 2, 3, 1]))
    other = ("--low-res", tmp_path / "other.npz", *common[2:])
    r = upsample("--flags", FLAG_STRING, "--checkpoint", files / "sr.pt", *other, "--resume")
    assert r.exit_code == 1 and "differs from the one" in r.output and "low_res" in r.output


def test_cli_upsample_cycles_and_reads_safetensors_flags(files, tmp_path):
    out = tmp_path / "run"
    r = upsample(
        "--checkpoint", files / "sr.safetensors", "--low-res", files / "low.npz", "--num-samples", 7,
        "--sampler", "ddim", "--steps", 2, "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with np.load(out / "samples_7x16x16x3.npz") as z:
        assert z["arr_1"].tolist() == [0, 1, 2, 3, 1, 0, 1]


def test_cli_unconditional_upsampler_ignores_the_labels(files, tmp_path):
    """super_res_sample.py reads arr_1 only for a class-conditional upsampler: a labelled npz (as
    a class-conditional base run writes) gives the unlabelled npz's samples, not a traceback."""
    flags = {**SR_FLAGS, "class_cond": False}
    torch.manual_seed(0)
    model = build_superres(**flags)
    save_weights(model, tmp_path / "uncond.safetensors", {"flags": flags})
    made = []
    for npz in ("low", "unlabelled"):  # the same images, with and without labels
        r = upsample("--checkpoint", tmp_path / "uncond.safetensors", "--low-res", files / f"{npz}.npz",
                     "--steps", 2, "--out", tmp_path / npz)  # fmt: skip
        assert r.exit_code == 0, r.output
        with np.load(tmp_path / npz / "samples_5x16x16x3.npz") as z:
            assert z.files == ["arr_0"]
            made.append(z["arr_0"])
    assert np.array_equal(*made)


def test_cli_upsample_resume_grows_with_its_low_res(files, tmp_path):
    """A low-res npz that kept its first images and gained more (an extended base run) extends the
    upsampled run, the same images as one run over it; other images for the samples already made
    (changed ones, or another cycle through a grown npz) are still refused."""
    images, labels = _low_res(5), np.array([0, 1, 2, 3, 1])
    np.savez(tmp_path / "three.npz", images[:3], labels[:3])
    common = ("--checkpoint", files / "sr.safetensors", "--steps", 2, "--batch-size", 2)
    assert upsample(*common, "--low-res", tmp_path / "three.npz", "--out", tmp_path / "grown").exit_code == 0
    r = upsample(*common, "--low-res", files / "low.npz", "--out", tmp_path / "grown", "--resume")
    assert r.exit_code == 0 and "3 images (2 already there)" in r.output, r.output
    assert upsample(*common, "--low-res", files / "low.npz", "--out", tmp_path / "once").exit_code == 0
    with (
        np.load(tmp_path / "grown" / "samples_5x16x16x3.npz") as a,
        np.load(tmp_path / "once" / "samples_5x16x16x3.npz") as b,
    ):
        assert np.array_equal(a["arr_0"], b["arr_0"])
    cycled = ("--low-res", tmp_path / "three.npz", "--num-samples", 4, "--out", tmp_path / "cycled")
    assert upsample(*common, *cycled).exit_code == 0  # sample 3 is image 0 again
    changed = images.copy()
    changed[0] ^= 1
    np.savez(tmp_path / "changed.npz", changed, labels)
    for npz, out in ((files / "low.npz", "cycled"), (tmp_path / "changed.npz", "grown")):
        r = upsample(*common, "--low-res", npz, "--out", tmp_path / out, "--resume")
        assert r.exit_code == 1 and "differs from the one" in r.output and "low_res" in r.output, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("--preset", "mnist", "--low-res", "low.npz"), "is a diffusion model, not a superres model"),
        (("--low-res", "missing.npz"), "missing.npz not found"),
        (("--low-res", "folder.npz"), "folder.npz is a folder, not an npz file"),
        (("--low-res", "big.npz"), "big.npz: 16x16x3 images; the upsampler takes 8x8x3"),
        (("--low-res", "unlabelled.npz"), "class-conditional but --low-res"),
        (("--low-res", "short_labels.npz"), "its arr_1 is not one integer label per image"),
        (("--low-res", "low.npz", "--steps", 500), "--steps must be between 2 and 100"),
        (("--low-res", "low.npz", "--engine", "graph"), "needs a CUDA device"),
        pytest.param(
            ("--low-res", "low.npz", "--engine", "trt"),
            "TensorRT not installed",
            marks=pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="has TensorRT"),
        ),
    ],
)
def test_cli_upsample_errors_are_one_line(files, tmp_path, args, message):
    args = [files / a if str(a).endswith(".npz") else a for a in args]
    if "--preset" not in args:
        args = ["--checkpoint", files / "sr.safetensors", *args]
    else:
        args = ["--checkpoint", files / "sr.pt", *args]
    r = upsample(*args, "--out", tmp_path / "run")
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_cli_upsample_num_samples_out_of_range_exits_2(files, tmp_path):
    """A number out of its option's range is a usage error, as click's ranges (it exited 1)."""
    args = ["--checkpoint", files / "sr.safetensors", "--low-res", files / "low.npz", "--num-samples", 10**20]
    r = upsample(*args, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "--num-samples must be at most 10000000" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_cli_upsample_reads_a_corrupt_low_res_before_the_upsampler_loads(files, tmp_path, monkeypatch):
    """A low-res npz whose data fails its CRC (the header reads fine) is one line before the
    weights load (it was found only after loading them)."""
    import fastdiff.runs.upsample

    np.savez(tmp_path / "corrupt.npz", _low_res(100), np.zeros(100, np.int64))
    data = bytearray((tmp_path / "corrupt.npz").read_bytes())
    data[-2000:-1990] = bytes(b ^ 0xFF for b in data[-2000:-1990])  # arr_0's last pixels: read last
    (tmp_path / "corrupt.npz").write_bytes(bytes(data))
    loaded = []
    monkeypatch.setattr(fastdiff.runs.upsample, "load_upsampler", lambda **kw: loaded.append(kw))
    r = upsample("--checkpoint", files / "sr.safetensors", "--low-res", tmp_path / "corrupt.npz",
                 "--out", tmp_path / "run")  # fmt: skip
    assert r.exit_code == 1 and "Bad CRC-32" in r.output and "Traceback" not in r.output, r.output
    assert loaded == [] and not (tmp_path / "run").exists()


def test_cli_upsample_reads_its_low_res_a_batch_at_a_time(files, tmp_path, monkeypatch):
    """The low-res npz is never held whole when it is stored (it was: 2.4 GB for 50,000 128-px
    images, beside the upsampler); a compressed one is, and upsamples to the same images."""
    import fastdiff.evaluation.npz

    load = fastdiff.evaluation.npz.ImageBatch.load
    np.savez_compressed(tmp_path / "compressed.npz", _low_res(5), np.array([0, 1, 2, 3, 1]))
    common = ("--checkpoint", files / "sr.safetensors", "--steps", 2, "--batch-size", 3, "--num-samples", 7)
    loaded, made = [], []
    monkeypatch.setattr(
        fastdiff.evaluation.npz.ImageBatch, "load", lambda self: loaded.append(self) or load(self)
    )
    for npz in (files / "low.npz", tmp_path / "compressed.npz"):
        r = upsample(*common, "--low-res", npz, "--out", tmp_path / npz.stem)
        assert r.exit_code == 0, r.output
        with np.load(tmp_path / npz.stem / "samples_7x16x16x3.npz") as z:
            made.append(z["arr_0"])
    assert [b.source for b in loaded] == [f"--low-res {tmp_path / 'compressed.npz'}"]
    assert np.array_equal(*made)


def test_low_res_rewritten_during_the_run_is_refused(tmp_path):
    """run.json names the low-res images by the digests taken before sampling; a batch read later
    from a rewritten npz is refused rather than upsampled under those digests."""
    from fastdiff.runs.errors import RunError
    from fastdiff.runs.upsample import read_low_res

    images = _low_res(5)
    np.savez(tmp_path / "low.npz", images)
    low_res = read_low_res(tmp_path / "low.npz")
    scaled = low_res.conditioning(3, 11)["low_res"]  # wraps around twice within one batch
    assert torch.equal(scaled, _scaled(images[np.arange(3, 11) % 5]))
    images[4] ^= 1
    np.savez(tmp_path / "low.npz", images)
    assert torch.equal(low_res.conditioning(0, 2)["low_res"], _scaled(images[:2]))
    with pytest.raises(RunError, match=r"low.npz changed during the run \(image 4 differs\)"):
        low_res.conditioning(3, 6)


def test_cli_upsample_names_itself_in_its_lock(files, tmp_path, monkeypatch):
    """A second command on a busy --out is told that fastdiff upsample holds it (it said sample)."""
    import fastdiff.runs.upsample
    from fastdiff.runs.errors import RunError

    def upsample_run(*args, out, **kwargs):
        raise RunError((out / ".lock").read_text())

    monkeypatch.setattr(fastdiff.runs.upsample, "upsample_run", upsample_run)
    r = upsample("--checkpoint", files / "sr.safetensors", "--low-res", files / "low.npz", "--out", tmp_path)
    assert r.exit_code == 1 and "Error: fastdiff upsample" in r.output, r.output


MNIST_SR_FLAGS = dict(
    large_size=64,
    small_size=32,
    in_channels=1,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1",
    attention_resolutions="",
    class_cond=True,
    num_classes=10,
    learn_sigma=True,
    diffusion_steps=100,
)


def test_sample_upsample_with_runs_the_cascade(files, tmp_path):
    """The bundled MNIST model then a tiny 32->64 upsampler: both resolutions, the upsampled run
    the same as `fastdiff upsample` on the base run's npz; a resume of the finished cascade is a no-op."""
    torch.manual_seed(0)
    sr = build_superres(**MNIST_SR_FLAGS)
    with torch.no_grad():
        for p in sr.parameters():
            p.normal_(0, 0.05)
    save_weights(sr, tmp_path / "sr.safetensors", {"flags": MNIST_SR_FLAGS})
    out = tmp_path / "run"
    args = ["sample", "--no-progress", "--device", "cpu", "--num-samples", 2, "--batch-size", 1, "--steps", 2]
    args += ["--classes", "4,7", "--out", out, "--upsample-with", tmp_path / "sr.safetensors"]
    r = CliRunner().invoke(main, [*map(str, args), "--upsample-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "upsampled: 2 images" in r.output
    with np.load(out / "samples_2x32x32x1.npz") as z:
        assert z["arr_1"].tolist() == [4, 7]
    with np.load(out / "upsampled" / "samples_2x64x64x1.npz") as z:
        cascade, labels = z["arr_0"], z["arr_1"]
    assert labels.tolist() == [4, 7]
    alone = tmp_path / "alone"
    r = upsample(
        "--checkpoint", tmp_path / "sr.safetensors", "--low-res", out / "samples_2x32x32x1.npz",
        "--steps", 2, "--batch-size", 1, "--out", alone,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with np.load(alone / "samples_2x64x64x1.npz") as z:
        assert np.array_equal(z["arr_0"], cascade)
    r = CliRunner().invoke(main, [*map(str, args), "--upsample-steps", "2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "0 images (2 already there)" in r.output and "upsampled: 0 images (2 already there)" in r.output
    # another upsampler setting is refused before the base model samples its new images
    more = [*map(str, args), "--resume", "--classes", "4,7,1", "--num-samples", "3"]
    r = CliRunner().invoke(main, [*more, "--upsample-steps", "3"])
    assert r.exit_code == 1 and "upsampled in: respacing" in r.output, r.output
    assert not (out / "samples_3x32x32x1.npz").exists() and not (out / "batches" / "batch_00002.npz").exists()
    # asking the cascade for more samples later extends both runs (the upsampled one refused its
    # grown low-res npz before, after the base run had sampled)
    args[args.index("4,7")] = "4,7,1"
    args[args.index("--num-samples") + 1] = 3
    r = CliRunner().invoke(main, [*map(str, args), "--upsample-steps", "2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "upsampled: 1 images (2 already there)" in r.output
    with np.load(out / "upsampled" / "samples_3x64x64x1.npz") as z:
        assert np.array_equal(z["arr_0"][:2], cascade) and z["arr_1"].tolist() == [4, 7, 1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--upsample-with", "{sr}"], "the base model's samples: 32x32x1 images; the upsampler takes 8x8x3"),
        (["--upsample-with", "{pt}"], "say which upsampler it is, PRESET:CHECKPOINT"),
        # a missing file says so first: a preset before it found no file either
        (["--upsample-with", "{pt}x"], "Error: --upsample-with checkpoint not found: "),
        (["--upsample-steps", "5"], "--upsample-steps needs --upsample-with"),
    ],
)
def test_sample_upsample_with_errors_before_sampling(files, tmp_path, extra, message):
    extra = [e.format(sr=files / "sr.safetensors", pt=files / "sr.pt") for e in extra]
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["sample", "--no-progress", "--out", str(out), *extra])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_upsample_with_names_a_preset_or_a_file():
    assert parse_upsampler_spec("upsampler64-256:/w/64_256_upsampler.pt") == (
        "upsampler64-256",
        Path("/w/64_256_upsampler.pt"),
    )
    assert parse_upsampler_spec("C:/w/sr.safetensors") == (None, Path("C:/w/sr.safetensors"))
    # the checkpoint's ~ is the home folder, as in UserPath options (it was a folder named ~)
    home = Path.home()
    assert parse_upsampler_spec("upsampler64-256:~/sr.pt") == ("upsampler64-256", home / "sr.pt")
    assert parse_upsampler_spec("~/sr.safetensors") == (None, home / "sr.safetensors")


@pytest.mark.parametrize("spec", ["upsampler64-256", "upsampler64-256:"])
def test_upsample_with_a_preset_without_its_weights_says_so(spec):
    """A preset named alone (or with nothing after its colon) was looked for as a file: "checkpoint
    not found: upsampler64-256", or "checkpoint . is a folder" for the empty path after the colon."""
    from fastdiff.runs import RunError

    with pytest.raises(
        RunError,
        match=rf"^--upsample-with {spec}: the preset's weights are missing;"
        r" pass upsampler64-256:CHECKPOINT$",
    ):
        parse_upsampler_spec(spec)


def test_cli_upsample_engine_onnx_errors_are_one_line(files, tmp_path, monkeypatch):
    """The onnx engine builds the upsampler's step (no export: the dtype is refused first)."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    r = upsample("--checkpoint", files / "sr.safetensors", "--low-res", files / "low.npz", "--steps", 2,
                 "--engine", "onnx", "--dtype", "bf16", "--out", tmp_path / "run")  # fmt: skip
    assert r.exit_code == 1 and "engine 'onnx' runs fp32 or fp16 graphs" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "cache").exists()


def test_cli_export_onnx_loads_a_preset_upsampler_with_its_low_res_shape(files, tmp_path, monkeypatch):
    """`fastdiff export onnx --preset upsampler64-256` (tiny flags over it) hands export_onnx the
    upsampler and its low_res shape (the real export is tests/test_export_onnx.py's, slow)."""
    import fastdiff.export
    from fastdiff.export import ExportError
    from fastdiff.models.unet import SuperResModel

    seen = {}

    def export_onnx(model, path, **kwargs):
        seen.update(model=model, path=path, **kwargs)
        raise ExportError("stop here")

    monkeypatch.setattr(fastdiff.export, "export_onnx", export_onnx)
    args = ["export", "onnx", "--preset", "upsampler64-256", "--flags", FLAG_STRING,
            "--checkpoint", files / "sr.pt", "--out", tmp_path]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and "stop here" in r.output, r.output
    assert isinstance(seen["model"], SuperResModel) and seen["low_res_shape"] == (3, 8, 8)
    assert seen["classifier"] is None and seen["null_label"] is None
    assert seen["path"] == tmp_path / "denoiser-superres-fp32.onnx"


def test_export_tells_an_upsampler_from_its_options(files):
    """fastdiff export onnx takes either kind: a superres preset, or flags with a small size."""
    assert names_upsampler("upsampler64-256", None, None)
    assert not names_upsampler("imagenet64", None, None) and not names_upsampler(None, None, None)
    assert names_upsampler(None, None, files / "sr.safetensors")  # its own flags
    assert names_upsampler(None, FLAG_STRING, files / "sr.pt")
    assert not names_upsampler(None, "--image_size 32", files / "sr.pt")
    assert not names_upsampler(None, "--not a flag", files / "sr.pt")  # the loader names the problem


def test_against_the_original_super_res_sampling(monkeypatch):
    """With FASTDIFF_GUIDED_DIFFUSION pointing at a guided-diffusion checkout: its own upsampler and
    p_sample_loop (super_res_sample.py's call, global RNG) against fastdiff.Sampler on the same
    weights, low-res images, labels and seed."""
    import os
    import sys

    root = os.environ.get("FASTDIFF_GUIDED_DIFFUSION")
    if not root:
        pytest.skip("set FASTDIFF_GUIDED_DIFFUSION to a guided-diffusion checkout")
    monkeypatch.syspath_prepend(root)
    script_util = pytest.importorskip("guided_diffusion.script_util")
    flags = script_util.sr_model_and_diffusion_defaults()
    flags.update(
        large_size=64, small_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8",
        num_head_channels=32, class_cond=True, learn_sigma=True, resblock_updown=True,
        timestep_respacing="4",
    )  # fmt: skip
    torch.manual_seed(0)
    original, original_diffusion = script_util.sr_create_model_and_diffusion(**flags)
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0, 0.05)
    original.eval()
    ours = build_superres(**{k: v for k, v in flags.items() if k != "timestep_respacing"})
    ours.load_state_dict(original.state_dict())
    low = _scaled(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    labels = torch.tensor([7, 981])
    torch.manual_seed(5)
    with torch.no_grad():
        want = original_diffusion.p_sample_loop(
            original, (2, 3, 64, 64), clip_denoised=True, model_kwargs={"low_res": low, "y": labels}
        )
    sampler = fastdiff.Sampler(ours, diffusion_from_flags(flags), sampler="ddpm", engine="eager")
    torch.manual_seed(5)
    got = sampler(labels, model_kwargs={"low_res": low})  # no generator: the global RNG, as the original
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    for name in [m for m in sys.modules if m.startswith("guided_diffusion")]:
        sys.modules.pop(name)
