"""`fastdiff sample` end to end on tiny random models: outputs, resume, and clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from builders import build_classifier, build_unet
from click.testing import CliRunner

from fastdiff.cli.main import main
from fastdiff.models.checkpoint import save_weights
from fastdiff.models.flags import format_flags
from fastdiff.runs.sampling import batch_generator

UNET_FLAGS = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=8,
    class_cond=True,
    num_classes=4,
    learn_sigma=True,
    diffusion_steps=40,
    noise_schedule="cosine",
    use_scale_shift_norm=True,
    resblock_updown=True,
)
CLASSIFIER_FLAGS = dict(
    image_size=8,
    classifier_width=32,
    classifier_depth=1,
    channel_mult="1,2",
    classifier_attention_resolutions="4",
    num_classes=4,
)


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_weights(_randomize(build_unet(**UNET_FLAGS)), d / "unet.safetensors", {"flags": UNET_FLAGS})
    save_weights(
        _randomize(build_classifier(**CLASSIFIER_FLAGS)), d / "clf.safetensors", {"flags": CLASSIFIER_FLAGS}
    )
    torch.save(_randomize(build_unet(**UNET_FLAGS)).state_dict(), d / "unet.pt")
    return d


def run(*args):
    result = CliRunner().invoke(main, ["sample", "--no-progress", *map(str, args)])
    return result


def base_args(models, out, *extra):
    return [
        "--checkpoint",
        models / "unet.safetensors",
        "--classifier",
        models / "clf.safetensors",
        "--classifier-scale",
        1.5,
        "--steps",
        4,
        "--out",
        out,
        *extra,
    ]


def test_help_for_every_command_lists_its_options():
    import click

    from fastdiff.cli.main import LazyGroup

    runner = CliRunner()
    for name in LazyGroup.commands_by_name:
        command = LazyGroup().get_command(None, name)
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, r.output
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0] in r.output, (name, param.opts[0])


def test_sample_writes_pngs_grid_and_npz(models, tmp_path):
    out = tmp_path / "out"
    r = run(*base_args(models, out, "--classes", "1,3", "--num-samples", 5, "--batch-size", 2))
    assert r.exit_code == 0, r.output
    assert "5 images" in r.output and "images/s" in r.output and "engine eager" in r.output
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs][:2] == ["000000_class1.png", "000001_class3.png"] and len(pngs) == 5
    assert (out / "grid.png").exists()
    data = np.load(out / "samples_5x8x8x3.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
    assert data["arr_1"].tolist() == [1, 3, 1, 3, 1]
    assert [p.name for p in out.rglob(".*")] == [".lock"]  # no temporary files left behind


def test_same_seed_same_images_and_resume_matches(models, tmp_path):
    full = tmp_path / "full"
    assert run(*base_args(models, full, "--num-samples", 6, "--batch-size", 2, "--seed", 3)).exit_code == 0
    # A run killed after its first two batches: its files are what remains, and --resume finishes it.
    part = tmp_path / "part"
    assert run(*base_args(models, part, "--num-samples", 4, "--batch-size", 2, "--seed", 3)).exit_code == 0
    (part / "batches" / "batch_00001.npz").unlink()  # the batch in flight at the kill never landed
    r = run(*base_args(models, part, "--num-samples", 6, "--batch-size", 2, "--seed", 3, "--resume"))
    assert r.exit_code == 0, r.output
    assert "4 images (2 already there)" in r.output
    a, b = np.load(full / "samples_6x8x8x3.npz"), np.load(part / "samples_6x8x8x3.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_images_are_a_function_of_seed_and_batch_size(models, tmp_path):
    """As --seed's help says: a batch's noise is (seed, batch index), so another --batch-size
    keeps the first batch's images and changes the rest, and a resume refuses it."""
    made = {}
    for bs in (2, 3):
        out = tmp_path / f"bs{bs}"
        r = run(*base_args(models, out, "--num-samples", 4, "--batch-size", bs, "--seed", 3))
        assert r.exit_code == 0, r.output
        made[bs] = np.load(out / "samples_4x8x8x3.npz")["arr_0"]
    np.testing.assert_array_equal(made[2][:2], made[3][:2])
    assert not np.array_equal(made[2][2:], made[3][2:])
    r = run(
        *base_args(models, tmp_path / "bs2", "--num-samples", 4, "--batch-size", 3, "--seed", 3, "--resume")
    )
    assert r.exit_code != 0 and "differs from the one in" in r.output and "batch_size" in r.output


def test_no_two_seeds_share_a_batchs_noise():
    """A batch's noise is keyed by (seed, batch index) so that runs of nearby seeds share no batch:
    seed s's batch i + 1 is not seed s + 1's batch i (a key of seed + index would repeat one run's
    images in the next seed's, a batch along). Runs compared with runs, or with references drawn
    through batch_generator itself, cannot show it."""
    drawn = {
        tuple(torch.randn(4, generator=batch_generator(torch.device("cpu"), seed, index)).tolist())
        for seed in range(4)
        for index in range(4)
    }
    assert len(drawn) == 16


def test_a_resume_on_another_device_type_is_refused(models, tmp_path):
    """A CUDA generator draws other noise than the CPU's from one seed, so a run made on one and
    resumed on the other would mix two runs' images; a run.json from before the device was
    recorded still resumes."""
    out = tmp_path / "out"
    assert run(*base_args(models, out, "--num-samples", 2, "--batch-size", 1)).exit_code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["device"] == "cpu"
    (out / "run.json").write_text(json.dumps({**record, "device": "cuda"}))
    r = run(*base_args(models, out, "--num-samples", 2, "--batch-size", 1, "--resume"))
    assert r.exit_code != 0 and r.output.strip().endswith("in: device ('cuda' in the run, 'cpu' now)"), (
        r.output
    )
    del record["device"]
    (out / "run.json").write_text(json.dumps(record))
    r = run(*base_args(models, out, "--num-samples", 2, "--batch-size", 1, "--resume"))
    assert r.exit_code == 0 and "0 images (2 already there)" in r.output, r.output


@pytest.mark.parametrize(
    "key, cases, line",
    [
        ("clip_guided_x0", [("dpm++2m", 4, True), ("ddim", 4, False)], "when x0 is clipped"),
        (
            "first_order_final",
            [("dpm++2m", 4, True), ("dpm++2m", 11, False), ("ddim", 4, False)],
            "the order of the last step",
        ),
    ],
)
def test_a_dpm_run_from_before_its_solver_changed_is_refused(models, tmp_path, key, cases, line):
    """dpm++2m clips the classifier-guided x0 now, and takes its last step at first order under
    10 steps; an earlier fastdiff clipped before guiding, and took it at second order. A run.json
    without the record (``key``) is such a run: its resume is refused, not mixed, where the
    solver differs; at 10 steps and more (the same last step) and for DDIM it resumes."""
    for sampler, steps, refused in cases:
        out = tmp_path / f"{sampler}{steps}"
        args = base_args(models, out, "--num-samples", 2, "--batch-size", 1, "--sampler", sampler)
        args[args.index("--steps") + 1] = steps
        assert run(*args).exit_code == 0
        record = json.loads((out / "run.json").read_text())
        assert record.pop(key) is refused
        (out / "run.json").write_text(json.dumps(record))
        r = run(*args, "--resume")
        if refused:
            assert r.exit_code != 0 and f"in: {line}" in r.output, r.output
        else:
            assert r.exit_code == 0 and "0 images (2 already there)" in r.output, r.output


def test_a_resume_at_another_thread_count_continues_within_a_level(models, tmp_path):
    """As the README says: another thread count (here also another default engine, parallel)
    rounds the float sums otherwise, so a resume allows it and its images are the run's to a
    level of 255."""
    args = ("--num-samples", 4, "--batch-size", 2, "--seed", 5)
    assert run(*base_args(models, tmp_path / "full", *args, "--threads", 1)).exit_code == 0
    part = tmp_path / "part"
    assert run(*base_args(models, part, *args, "--threads", 1)).exit_code == 0
    (part / "batches" / "batch_00001.npz").unlink()
    before = torch.get_num_threads()
    try:
        r = run(*base_args(models, part, *args, "--threads", 2, "--resume"))
    finally:
        torch.set_num_threads(before)  # --threads sets this process's count
    assert r.exit_code == 0 and "2 images (2 already there)" in r.output and "engine parallel" in r.output
    a, b = (np.load(d / "samples_4x8x8x3.npz")["arr_0"].astype(int) for d in (tmp_path / "full", part))
    assert np.abs(a - b).max() <= 1


def test_compile_engine_pads_the_last_partial_batch(models, tmp_path, monkeypatch):
    """--engine compile with a partial last batch (5 = 4 + 1) compiles one step: the last batch
    runs padded through the first's (it compiled again, minutes on the CPU), and the npz is
    eager's at the same seed. Dynamo alone runs the graph (inductor's compile takes minutes)."""
    graphs = []
    real_compile = torch.compile

    def counted(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counted}))
    npz = {}
    for engine in ("compile", "eager"):
        args = ("--num-samples", 5, "--batch-size", 4, "--seed", 2, "--engine", engine, "--threads", 1)
        r = run(*base_args(models, tmp_path / engine, *args))
        assert r.exit_code == 0, r.output
        npz[engine] = np.load(tmp_path / engine / "samples_5x8x8x3.npz")
    assert len(graphs) == 1
    got, want = (npz[e]["arr_0"].astype(int) for e in ("compile", "eager"))
    assert np.abs(got - want).max() <= 1  # uint8 pixels: rounding may flip one level
    np.testing.assert_array_equal(npz["compile"]["arr_1"], npz["eager"]["arr_1"])


def test_existing_run_needs_resume_and_same_settings(models, tmp_path):
    out = tmp_path / "out"
    assert run(*base_args(models, out, "--num-samples", 2)).exit_code == 0
    r = run(*base_args(models, out, "--num-samples", 2))
    assert r.exit_code != 0 and "--resume" in r.output
    r = run(*base_args(models, out, "--num-samples", 2, "--seed", 9, "--resume"))
    assert r.exit_code != 0 and "seed" in r.output


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_other_samplers_and_cfg_errors(models, tmp_path, sampler):
    r = run(*base_args(models, tmp_path / sampler, "--sampler", sampler, "--num-samples", 2))
    assert r.exit_code == 0, r.output
    r = run(*base_args(models, tmp_path / "cfg", "--cfg-scale", 2.0, "--num-samples", 2))
    assert r.exit_code != 0 and "null label" in r.output


def test_pt_checkpoint_with_flag_string(models, tmp_path):
    flags = " ".join(f"--{k} {v}" for k, v in UNET_FLAGS.items())
    r = run(
        "--checkpoint",
        models / "unet.pt",
        "--flags",
        flags,
        "--steps",
        2,
        "--num-samples",
        1,
        "--classes",
        "2",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output


def test_networks_with_no_res_blocks_sample(tmp_path):
    """num_res_blocks / classifier_depth 0 and dropout 1.0, which guided-diffusion builds (fastdiff
    refused the flags), from .pt state dicts and flag strings."""
    unet_flags = {**UNET_FLAGS, "num_res_blocks": 0, "dropout": 1.0}
    clf_flags = {**CLASSIFIER_FLAGS, "classifier_depth": 0, "classifier_width": 64}  # 64-channel heads
    torch.save(_randomize(build_unet(**unet_flags)).state_dict(), tmp_path / "unet.pt")
    torch.save(_randomize(build_classifier(**clf_flags)).state_dict(), tmp_path / "clf.pt")
    r = run(
        *("--checkpoint", tmp_path / "unet.pt", "--flags", format_flags(unet_flags)),
        *("--classifier", tmp_path / "clf.pt", "--classifier-flags", format_flags(clf_flags)),
        *("--classifier-scale", 1, "--steps", 2, "--num-samples", 2, "--classes", "1,2"),
        *("--out", tmp_path / "o"),
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "o" / "samples_2x8x8x3.npz")["arr_0"].shape == (2, 8, 8, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "missing.pt", "--preset", "imagenet64"], "not found"),
        (["--classes", "7"], "out of range"),
        (["--preset", "nope"], "unknown preset"),
        (["--engine", "warp"], "'warp' is not one of"),
        (["--engine", "trt"], "TensorRT not installed"),
        (["--engine", "graph", "--device", "cpu"], "needs a CUDA device"),
        (["--sampler", "ddpm", "--eta", 0.5], "does not use it"),
        (["--classifier", None], "needs a classifier"),
        (["--sampler", "ddim", "--steps", 0], "--steps"),
    ],
)
def test_bad_input_is_one_clear_line(models, tmp_path, args, message):
    argv = [
        "--checkpoint",
        models / "unet.safetensors",
        "--classifier",
        models / "clf.safetensors",
        "--classifier-scale",
        1.0,
        "--steps",
        2,
        "--num-samples",
        1,
        "--out",
        tmp_path / "o",
    ]
    for i in range(0, len(args), 2):
        if args[i] in argv:
            j = argv.index(args[i])
            del argv[j : j + 2]
        if args[i + 1] is not None:
            argv += [args[i], args[i + 1]]
    r = run(*argv)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o" / "batches").exists() or not list((tmp_path / "o" / "batches").iterdir())


def test_checkpoint_that_does_not_fit_the_preset(models, tmp_path):
    r = run("--preset", "imagenet64", "--checkpoint", models / "unet.pt", "--out", tmp_path / "o")
    assert r.exit_code != 0
    assert "missing" in r.output or "shape" in r.output


def test_unsupported_image_size(models, tmp_path):
    flags = " ".join(f"--{k} {v}" for k, v in UNET_FLAGS.items() if k != "channel_mult")
    flags = flags.replace("--image_size 8", "--image_size 48")
    r = run("--checkpoint", models / "unet.pt", "--flags", flags, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "image size 48" in r.output


def test_nan_names_the_step_and_writes_nothing(models, tmp_path):
    model = build_unet(**UNET_FLAGS)
    sd = {
        k: torch.full_like(v, float("nan")) if k == "out.2.bias" else v for k, v in model.state_dict().items()
    }
    save_weights(sd, tmp_path / "nan.safetensors", {"flags": UNET_FLAGS})
    r = run(
        "--checkpoint",
        tmp_path / "nan.safetensors",
        "--steps",
        3,
        "--num-samples",
        2,
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code != 0
    assert "sampling step 1/3" in r.output and "nothing of this batch was written" in r.output
    assert not list((tmp_path / "o").glob("batches/*.npz"))


def test_presets_command():
    r = CliRunner().invoke(main, ["presets"])
    assert r.exit_code == 0 and "imagenet256" in r.output
    r = CliRunner().invoke(main, ["presets", "imagenet64"])
    assert "--image_size 64" in r.output
    r = CliRunner().invoke(main, ["presets", "bogus"])
    assert r.exit_code != 0 and "unknown preset" in r.output


def test_threads_are_chosen_deliberately(monkeypatch):
    from fastdiff.runs.device import choose_threads

    before = torch.get_num_threads()
    try:
        assert choose_threads(1) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert choose_threads(None) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("os.getloadavg", lambda: (99.0, 0.0, 0.0))  # every core busy
        monkeypatch.setattr("fastdiff.runs.device.runnable_others", lambda: 5)
        assert choose_threads(None) == 1
        # a load average left by a job that has ended: nothing else runnable now, every core is free
        monkeypatch.setattr("fastdiff.runs.device.runnable_others", lambda: 0)
        assert choose_threads(None) == len(os.sched_getaffinity(0))
        for unusable in ("0", "abc"):  # no thread count, as OpenMP reads it: the same default
            monkeypatch.setenv("OMP_NUM_THREADS", unusable)
            assert choose_threads(None) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_unconditional_model_with_a_classifier_at_scale_zero(models, tmp_path):
    """As classifier_sample.py at scale 0: the requested labels are written, the samples are the
    unguided ones (the labels were handed to a Sampler that takes none: a traceback at batch 0)."""
    flags = {**UNET_FLAGS, "class_cond": False}
    save_weights(_randomize(build_unet(**flags)), tmp_path / "uncond.safetensors", {"flags": flags})
    common = ["--checkpoint", tmp_path / "uncond.safetensors", "--steps", 2, "--num-samples", 3]
    unguided = ["--classifier", models / "clf.safetensors", "--classifier-scale", 0]
    r = run(*common, *unguided, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert run(*common, "--out", tmp_path / "b").exit_code == 0
    a, b = np.load(tmp_path / "a" / "samples_3x8x8x3.npz"), np.load(tmp_path / "b" / "samples_3x8x8x3.npz")
    assert a["arr_1"].tolist() == [0, 1, 2] and "arr_1" not in b
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_a_process_with_no_valid_betas_is_one_line(models, tmp_path):
    """The linear schedule's betas end at 20 / diffusion_steps: fewer than 20 steps is a flag
    error, not a ValueError traceback from the process tables."""
    flags = {**UNET_FLAGS, "diffusion_steps": 10, "noise_schedule": "linear"}
    flag_string = " ".join(f"--{k} {v}" for k, v in flags.items())
    r = run("--checkpoint", models / "unet.pt", "--flags", flag_string, "--out", tmp_path / "o")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)  # a ClickException, not a bug
    assert "at least 20" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_a_cpu_sampling_run_imports_no_dynamo_sympy_or_triton(tmp_path):
    """The default `fastdiff sample` on the CPU compiles nothing, so it imports neither torch's
    dynamo (fastdiff.ops' constant marks imported it, with sympy and FSDP: ~1 s of a job of 8)
    nor sympy (a grad_outputs tensor in the attention backward imported it: 0.3 s), and it
    launches no Triton kernel, so it imports no triton (fastdiff.ops checked it at import: 0.2 s)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fastdiff.cli.main import main\n"
        "args = ['sample', '--no-progress', '--num-samples', '2', '--steps', '2']\n"
        f"args += ['--out', {str(tmp_path)!r}]\n"
        "result = CliRunner().invoke(main, args)\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTDIFF_OPS": "auto"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_constant_result_marks_functions_as_torch_does():
    """fastdiff.ops' constant_result sets the mark torch.compiler.assume_constant_result sets, so
    dynamo still folds those calls into constants where it traces."""
    from fastdiff.ops._backend import constant_result

    def ours():
        return True

    def torchs():
        return True

    assert constant_result(ours) is ours
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) != {}
