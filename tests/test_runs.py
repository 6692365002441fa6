"""fastdiff.runs from Python: a run without the CLI writes what `fastdiff sample` writes, and a
user error is the library's RunError, not click's."""

from __future__ import annotations

import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import fastdiff
from fastdiff.cli.main import main
from fastdiff.runs import RunError

TINY = dict(num_samples=3, batch_size=2, steps=2, classes="3,7", device="cpu", threads=1)

RUN = """
import sys
import fastdiff

summary = fastdiff.sample_run(sys.argv[1], num_samples=3, batch_size=2, steps=2, classes="3,7",
                              device="cpu", threads=1)
assert summary["images"] == 3, summary
assert "fastdiff.cli" not in sys.modules, "a library run imported the CLI"
assert "click" not in sys.modules, "a library run imported click"
"""


def test_a_run_from_python_needs_no_cli_and_writes_what_the_cli_writes(tmp_path):
    subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "lib")], check=True, timeout=600)
    args = ["sample", "--no-progress", "--num-samples", "3", "--batch-size", "2", "--steps", "2"]
    args += ["--classes", "3,7", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "cli")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for name in ("run.json", "samples_3x32x32x1.npz", "grid.png", "batches/batch_00001.npz"):
        assert (tmp_path / "lib" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_import_is_cheap():
    code = (
        "import sys, fastdiff, fastdiff.runs\nfastdiff.RunError\n"
        "assert {'Sampler', 'sample_run', 'RunError'} <= set(dir(fastdiff)), dir(fastdiff)\n"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_user_error_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="--steps must be between 2 and") as e:
        fastdiff.sample_run(tmp_path / "a", **{**TINY, "steps": 1})
    assert not isinstance(e.value, click.ClickException)
    assert not (tmp_path / "a").exists()  # refused before the folder was made


def test_triton_mode_without_triton_is_one_run_error(tmp_path, monkeypatch):
    """FASTDIFF_OPS=triton asks for the kernels: without triton every op silently ran its
    PyTorch reference instead. A run (and gd-run) says so before any work."""
    from fastdiff.cli.gd_run import gd_run_command
    from fastdiff.ops import _backend

    monkeypatch.setattr(_backend, "_TRITON_PROBLEM", "triton is not installed")
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    with pytest.raises(RunError, match="FASTDIFF_OPS=triton runs the Triton kernels, but triton is not"):
        fastdiff.sample_run(tmp_path / "a", **TINY)
    assert not (tmp_path / "a").exists()
    (tmp_path / "script.py").write_text("raise SystemExit('the script ran')\n")
    res = CliRunner().invoke(gd_run_command, [str(tmp_path / "script.py")])
    assert res.exit_code == 1 and "triton is not installed" in res.output and "Traceback" not in res.output
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    fastdiff.runs.device.check_ops_mode()  # other modes need no triton


def test_a_folder_holding_a_run_needs_resume_and_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    assert fastdiff.sample_run(out, **TINY)["images"] == 3
    with pytest.raises(RunError, match="already holds a sampling run"):
        fastdiff.sample_run(out, **TINY)
    with pytest.raises(RunError, match=r"differs from the one in .* in: seed \(0 in the run, 1 now\)$"):
        fastdiff.sample_run(out, **{**TINY, "seed": 1}, resume=True)
    # the option a user typed (--steps) is no setting's name: the values say what changed
    with pytest.raises(RunError, match=r" in: respacing \('ddim2' in the run, 'ddim3' now\)$"):
        fastdiff.sample_run(out, **{**TINY, "steps": 3}, resume=True)
    summary = fastdiff.sample_run(out, **{**TINY, "num_samples": 4}, resume=True)
    assert (summary["images"], summary["skipped"]) == (2, 2)  # the partial last batch is made again
    assert (out / "samples_4x32x32x1.npz").is_file() and not (out / "samples_3x32x32x1.npz").exists()


def test_the_bundled_models_run_json_is_the_same_from_any_install(tmp_path, monkeypatch):
    """run.json named the bundled networks by their absolute paths: two installs recorded one job
    in other bytes. An older run.json, which has those paths, still resumes (weights by content)."""
    import json
    import shutil

    from fastdiff.runs import loading

    run = {**TINY, "classes": None}
    fastdiff.sample_run(tmp_path / "a", **run)
    other = tmp_path / "install" / "assets"  # a link, as a packager may make it
    shutil.copytree(loading.ASSETS, tmp_path / "shared")
    other.parent.mkdir()
    other.symlink_to(tmp_path / "shared")
    monkeypatch.setattr(loading, "ASSETS", other)
    monkeypatch.setattr(loading, "BUNDLED_MODEL", other / "mnist" / "diffusion.safetensors")
    monkeypatch.setattr(loading, "BUNDLED_CLASSIFIER", other / "mnist" / "classifier.safetensors")
    fastdiff.sample_run(tmp_path / "b", **run)
    record = (tmp_path / "a" / "run.json").read_text()
    assert record == (tmp_path / "b" / "run.json").read_text()
    old = json.loads(record)
    assert [old[k]["checkpoint"] for k in ("model", "classifier")] == [
        "bundled:mnist/diffusion.safetensors",
        "bundled:mnist/classifier.safetensors",
    ]
    for key, name in (("model", "diffusion"), ("classifier", "classifier")):
        old[key]["checkpoint"] = str(other / "mnist" / f"{name}.safetensors")
    (tmp_path / "b" / "run.json").write_text(json.dumps(old))
    summary = fastdiff.sample_run(tmp_path / "b", **{**run, "num_samples": 4}, resume=True)
    assert (summary["images"], summary["skipped"]) == (2, 2)


def test_a_refused_foreign_folder_keeps_no_lock_file(tmp_path):
    """A folder no fastdiff command held (a project folder; sample_run("") is the cwd) is refused
    before the lock, whose file stayed behind in it; a run folder's lock is taken as before."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="is not empty and holds no run.json of a sampling run"):
        fastdiff.sample_run(tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_every_resume_refuses_an_out_that_does_not_exist(tmp_path):
    """--resume into a folder that does not exist (a typo'd path) is one line (exit 2) naming it;
    sample, upsample and invert started a new run there silently (train: test_cli_main)."""
    from fastdiff.runs.folder import locked_run_folder

    for command in ("sample", "invert"):
        with pytest.raises(RunError, match="--resume: --out .*typo does not exist, so there is no run") as e:
            with locked_run_folder(tmp_path / "typo", resume=True, command=command):
                pass
        assert e.value.usage and not (tmp_path / "typo").exists()
    (tmp_path / "killed").mkdir()  # a run killed before its first batch: resumes from the start
    with locked_run_folder(tmp_path / "killed", resume=True):
        pass


def test_a_foreign_folder_is_named_as_the_command_runs_it(tmp_path):
    """fastdiff invert into a non-empty folder said it held no *sampling* run."""
    from fastdiff.runs.folder import locked_run_folder

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"holds no run.json of an inversion \(fastdiff invert\); choose"):
        with locked_run_folder(tmp_path, command="invert"):
            pass


def test_an_upsampling_user_error_is_a_run_error(tmp_path):
    from fastdiff.runs import upsample_file_run

    with pytest.raises(RunError, match="--low-res .*missing.npz not found"):
        upsample_file_run(tmp_path / "missing.npz", tmp_path / "up", checkpoint=None, device="cpu")
    # fastdiff sample's --out, given as --low-res: the npz in it is named (it said "not a file")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "samples_2x8x8x3.npz").write_bytes(b"")
    with pytest.raises(RunError, match=r"s is a folder, not an npz file: pass .*s/samples_2x8x8x3.npz$"):
        upsample_file_run(tmp_path / "s", tmp_path / "up", num_samples=2, checkpoint=None, device="cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sampler": "dpm++"}, "unknown sampler 'dpm\\+\\+'; choose one of: ddim, ddpm, dpm\\+\\+2m"),
        ({"dtype": "fp64"}, "unknown dtype 'fp64'; choose one of: fp32, fp16, bf16"),
        ({"threads": 0}, "--threads must be >= 1, got 0"),
        ({"engine": "onnx", "dtype": "bf16"}, "runs fp32 or fp16 graphs|not installed"),
        ({"eta": 1.5}, "--eta must be a finite number >= 0 and <= 1"),
        ({"num_samples": "3"}, "sample_run: num_samples '3': expected int"),
        ({"eta": "0.1"}, "sample_run: eta '0.1': expected float"),
        ({"classes": [3, 7]}, "sample_run: classes \\[3, 7\\]: expected str \\| None"),
        ({"classifier_scale": "2"}, "sample_run: classifier_scale '2': expected float \\| None"),
        ({"preset": "imagenet65", "checkpoint": "missing.pt"}, "unknown preset 'imagenet65'"),
        # was a TypeError when the run first reported, after sampling and writing every batch
        ({"report": 3}, "sample_run: report 3: expected a callable or None"),
    ],
)
def test_a_wrong_option_is_one_run_error_before_the_folder(tmp_path, change, message):
    with pytest.raises(RunError, match=message) as e:
        fastdiff.sample_run(tmp_path / "a", **{**TINY, **change})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a").exists()


def test_a_callback_is_left_to_the_callable_check():
    """Python 3.10 counts ``Callable[...]`` as a type: sample_run's ``report`` became a typed
    field, and its isinstance check raised TypeError at the start of every run (and `fastdiff sample`)."""
    import dataclasses

    from fastdiff.runs.errors import _arguments_of

    checked = {f.name for f in dataclasses.fields(_arguments_of(fastdiff.sample_run))}
    assert "report" not in checked and {"num_samples", "classes", "device"} <= checked


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classifier_flags": "--image_size 28"}, "--classifier-preset/--classifier-flags need --classifier"),
        ({"upsample_steps": 5}, "--upsample-steps needs --upsample-with"),
    ],
)
def test_an_option_missing_its_partner_is_refused_before_the_model_loads(
    tmp_path, monkeypatch, change, message
):
    """Both were checked only after the diffusion model (and the classifier) had loaded, gigabytes
    for ADM's checkpoints, against the house rule that option errors come first."""
    import fastdiff.runs.sample as sample_module

    def never(**kw):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(sample_module, "load_diffusion_model", never)
    with pytest.raises(RunError, match=message):
        fastdiff.sample_run(tmp_path / "a", **{**TINY, **change})
    assert not (tmp_path / "a").exists()


def test_load_diffusion_model_takes_names_and_paths_as_strings():
    from fastdiff.runs import load_diffusion_model
    from fastdiff.runs.loading import BUNDLED_MODEL

    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=str(BUNDLED_MODEL), device="auto")
    assert loaded.image_size == 32
    with pytest.raises(RunError, match="unknown device 'gpu'"):
        load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device="gpu")


def test_weights_of_another_kind_are_named_so():
    """A classifier's weights given as a diffusion model (or the other way round) were read with
    the other kind's flags: 'diffusion flags: --classifier_width is not a diffusion model flag (a
    classifier's flags go in --classifier-flags)' named no mistake the user made."""
    from fastdiff.runs import load_diffusion_model
    from fastdiff.runs.loading import BUNDLED_CLASSIFIER, BUNDLED_MODEL, load_classifier

    with pytest.raises(RunError) as e:
        load_diffusion_model(preset=None, flag_string=None, checkpoint=BUNDLED_CLASSIFIER, device="cpu")
    assert str(e.value) == (
        f"{BUNDLED_CLASSIFIER} holds a classifier model (fastdiff train-classifier's weights), not a"
        " diffusion model"
    )
    with pytest.raises(
        RunError, match=r"holds a diffusion model \(fastdiff train's weights\), not a classifier"
    ):
        load_classifier(BUNDLED_MODEL, preset=None, flag_string=None, image_size=32, device="cpu")


@pytest.mark.parametrize(
    "flags, theirs",
    [
        ("--diffusion_steps 100", "--diffusion_steps 1000"),  # sampled with another process, unseen
        ("--num_channels 64", "--num_channels 32"),  # a dump of 100 wrong shapes
        ("--class_cond True --use_new_attention_order True", "--use_new_attention_order False"),
        # no network at all beside the weights' channel_mult: it said to pass another channel_mult
        ("--image_size 34", "--image_size 32"),
    ],
)
def test_flags_that_contradict_a_checkpoints_own_are_one_line(flags, theirs):
    """--flags over a safetensors that carries its flags replaced them: another width was a dump of
    wrong shapes, and another --diffusion_steps, schedule or attention order sampled the weights
    with a process or network they were not trained with, without a word. Flags that restate
    them, or say only how the network runs (use_fp16, dropout), still load."""
    from fastdiff.runs import load_diffusion_model
    from fastdiff.runs.loading import BUNDLED_CLASSIFIER, BUNDLED_MODEL, load_classifier

    with pytest.raises(RunError) as e:
        load_diffusion_model(preset=None, flag_string=flags, checkpoint=BUNDLED_MODEL, device="cpu")
    assert str(e.value).startswith(f"flag --{flags.split('--')[-1].strip()} contradicts the flags ")
    assert f"{BUNDLED_MODEL} carries ({theirs}): its weights were trained with them" in str(e.value)
    same = "--image_size 32 --num_channels 32 --noise_schedule cosine --use_fp16 True --dropout 0.1"
    assert load_diffusion_model(
        preset=None, flag_string=same, checkpoint=BUNDLED_MODEL, device="cpu"
    ).net.use_fp16
    with pytest.raises(RunError, match=r"flag --classifier_depth 2 contradicts .* \(--classifier_depth 1\)"):
        load_classifier(
            BUNDLED_CLASSIFIER, preset=None, flag_string="--classifier_depth 2", image_size=32, device="cpu"
        )


def test_invert_and_interpolate_check_their_arguments(tmp_path):
    from fastdiff.runs import DDIMOptions, interpolate, invert_images

    with pytest.raises(RunError, match="DDIMOptions: steps '10': expected int \\| None"):
        DDIMOptions(steps="10")
    with pytest.raises(RunError, match="interpolate: frames '8': expected int"):
        interpolate("3", "8", str(tmp_path / "s.png"), DDIMOptions(), frames="8")
    with pytest.raises(RunError, match="--batch-size must be >= 1"):
        invert_images([tmp_path / "a.png"], str(tmp_path / "o"), DDIMOptions(), batch_size=0)


def test_default_steps_are_capped_at_the_models():
    """No --steps on a model with fewer diffusion steps than the sampler's default samples every
    step; only steps the user gave are refused, quoting them."""
    from fastdiff.runs.plan import respacing_for

    assert respacing_for("ddpm", None, None, 100) == "100"
    assert respacing_for("ddim", None, None, 10) == "ddim10"
    assert respacing_for("ddim", None, None, 1000) == "ddim25"
    with pytest.raises(RunError, match="--steps must be between 2 and 100, got 250"):
        respacing_for("ddpm", 250, None, 100)


def test_dpm_solver_steps_start_at_the_last_time():
    """dpm++2m's --steps N spaces N times over 0 .. T-1 as the DPM-Solver references do; "ddimN"
    started at T - T/N, treating x_T as x_900 at 10 steps of 1000 (unguided 81% vs 94% of the
    bundled model's digits read as asked)."""
    from fastdiff.diffusion.schedule import kept_steps
    from fastdiff.runs.plan import respacing_for

    assert kept_steps(1000, respacing_for("dpm++2m", 10, None, 1000)) == [
        0,
        111,
        222,
        333,
        444,
        555,
        666,
        777,
        888,
        999,
    ]
    assert kept_steps(1000, respacing_for("dpm++2m", None, None, 1000))[-1] == 999  # the default 20
    assert respacing_for("ddim", 10, None, 1000) == "ddim10"  # DDIM keeps guided-diffusion's meaning


class _Stop(Exception):
    """Ends a faked rank's run at its first barrier (the other rank's batches never come)."""


def _two_ranks(monkeypatch, rank: int, events: list, notes=(None, None)) -> None:
    """This process as rank ``rank`` of 2: every collective is recorded in ``events``; an
    all-gather hands back ``notes`` (the ranks' notes: an error's line and whether it is a usage
    error, or None), a broadcast this rank's value."""
    # fastdiff.training.dist binds these names at import, and a run loading a checkpoint imports
    # it: imported first under these stand-ins, the trainers of the process's later tests kept them
    import fastdiff.training.dist  # noqa: F401
    from fastdiff import distributed

    def gather(obj):
        events.append("gather")
        return list(notes)

    def barrier():
        events.append("barrier")
        raise _Stop

    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_gather_objects", gather)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(distributed, "barrier", barrier)


@pytest.mark.parametrize("command", ["sample", "interpolate"])
def test_rank_0_builds_a_cached_engine_before_the_others_go_on(tmp_path, monkeypatch, command):
    """Every rank exported the same ONNX graph at once under torchrun (92 s each on the CPU; a
    TensorRT build per GPU): rank 0 now builds the onnx step before a collective every rank waits
    at, so the others find its file in the cache."""
    from fastdiff import distributed, engines
    from fastdiff.runs import DDIMOptions, interpolate

    events = []

    def onnx(step, device):  # the export and its session, recorded; eager's step runs
        if step is not None:
            events.append("build")
        return step

    def gathered(obj):  # the strip's frames reach rank 0: the run is over
        events.append("gather_objects")
        raise _Stop

    monkeypatch.setitem(engines.ENGINES, "onnx", onnx)
    monkeypatch.setattr(distributed, "gather_objects", gathered)
    # the run checks it can write to the ONNX cache: the user's (~/.cache) failed where HOME is read-only
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    _two_ranks(monkeypatch, 0, events)
    with pytest.raises(_Stop):
        if command == "sample":
            fastdiff.sample_run(tmp_path / "run", **TINY, engine="onnx")
        else:
            options = DDIMOptions(steps=2, engine="onnx", threads=1, device="cpu")
            interpolate("1", "2", tmp_path / "s.png", options, frames=3, label=3, batch_size=2)
    # the checks, then the build and the gather the other rank waits at, then the batches (and
    # the gather that ends their phase)
    after = ["barrier"] if command == "sample" else ["gather", "gather_objects"]
    assert events.count("build") == 1 and events[-2 - len(after) :] == ["build", "gather", *after], events


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0s_engine_build_failure_is_every_ranks_line(monkeypatch, rank):
    import types

    from fastdiff.engines import EngineError
    from fastdiff.runs.sampling import built_once

    line = "cannot write to the ONNX cache /x (FASTDIFF_CACHE sets where it is)"
    built = []

    def warmup(labels, n, model_kwargs):
        built.append(n)
        raise EngineError(line)

    sampler = types.SimpleNamespace(engine="onnx", warmup=warmup)
    built_once(sampler, 2)  # outside torchrun: nothing now, the first batch builds it
    assert built == []
    events = []
    _two_ranks(monkeypatch, rank, events, notes=((line, False), None))
    with pytest.raises(RunError, match="^cannot write to the ONNX cache /x"):
        built_once(sampler, 2)
    assert built == ([2] if rank == 0 else []) and events == ["gather"]  # rank 1 waited, built nothing
    built_once(types.SimpleNamespace(engine="eager", warmup=warmup), 2)  # its own build per rank
    assert events == ["gather"]


def test_merging_more_batches_than_the_open_file_limit(tmp_path):
    """Each batch npz is closed once read: merge_batches held every batch's file open, so a run of
    more batches than the open-file limit (1024 on many systems) failed with EMFILE at the end."""
    import os
    import resource

    import numpy as np

    from fastdiff.files import save_npz
    from fastdiff.runs.writer import batch_npz, merge_batches

    n = 60
    for b in range(n):
        (tmp_path / "batches").mkdir(exist_ok=True)
        save_npz(batch_npz(tmp_path, b), np.full((1, 2, 2, 1), b, np.uint8), np.array([b]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 30, hard))  # fewer files than batches
    try:
        merge_batches(tmp_path, [(b, b + 1) for b in range(n)], (2, 2, 1), labelled=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with np.load(tmp_path / "samples_60x2x2x1.npz") as z:
        assert z["arr_1"].tolist() == list(range(n)) and z["arr_0"][:, 0, 0, 0].tolist() == list(range(n))


def test_merge_batches_streams_the_final_npz_one_batch_at_a_time(tmp_path):
    """The final npz is np.savez's file of every batch (labels too), written holding about one
    batch: it concatenated every batch and then saved the copy, about twice the whole run in
    memory (20 GB for 50,000 ImageNet-256 samples) after all the sampling."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from fastdiff.files import save_npz
    from fastdiff.runs.writer import batch_npz, merge_batches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 32, 32, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 2000)
    batches = [(lo, min(lo + 30, 2000)) for lo in range(0, 2000, 30)]  # the grid spans batches
    for b, (lo, hi) in enumerate(batches):
        save_npz(batch_npz(tmp_path, b), images[lo:hi], labels[lo:hi])
    merge_batches(tmp_path, batches, (32, 32, 1), labelled=True)  # its imports, untraced
    tracemalloc.start()
    try:
        merge_batches(tmp_path, batches, (32, 32, 1), labelled=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 2  # was over 2 x images.nbytes
    save_npz(tmp_path / "whole.npz", images, labels)
    assert (tmp_path / "samples_2000x32x32x1.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid[2:34, 2:34], images[0, ..., 0]) and grid.shape == (10 * 34 + 2, 10 * 34 + 2)
    assert np.array_equal(grid[-34:-2, -34:-2], images[99, ..., 0])


@pytest.mark.parametrize(
    "names, spec, want",
    [
        (["10", "2"], "2,10", [1, 0]),  # folders named by numbers: the names
        (["10", "2"], "0", "'0' is no class name"),  # was class 0, folder 10, silently
        (["10", "2"], "1", "(class 0 is '10'): give names (10, 2)"),  # was folder 2
        (["0", "1", "10", "2"], "3", "'3' is no class name"),  # was id 3, folder 2
        (["0", "1", "2"], "2,0", [2, 0]),  # names that are their ids (mnist): either reading
        (["cat", "dog"], "dog,0", [1, 0]),  # names that are no numbers leave the ids free
        (["cat", "dog"], "cat,bird,owl", "got 'bird', 'owl' (in 'cat,bird,owl')"),  # quoted the list
        (None, "3,1", [3, 1]),
    ],
)
def test_class_ids_read_a_number_one_way(names, spec, want):
    """A number given to a model whose classes are named by other numbers is refused rather than
    read as an id: with folders 10 and 2, '--classes 0' was folder 10 and '1' folder 2."""
    from fastdiff.runs.plan import class_ids

    if isinstance(want, list):
        assert class_ids(spec, names=names) == want
    else:
        with pytest.raises(RunError, match=".*".join(map(re.escape, ["--classes", want]))):
            class_ids(spec, names=names)


def test_errors_about_many_class_names_stay_short():
    """A 1,000-folder model's names in --classes' error and the classifier's refusal are cut to a
    dozen and the count (they listed every name: lines of 10,000+ characters)."""
    from types import SimpleNamespace

    from fastdiff.runs.loading import check_classifier
    from fastdiff.runs.plan import class_ids

    names = [f"n{i:08d}" for i in range(1000)]
    with pytest.raises(RunError) as e:
        class_ids("owl", names=names)
    assert "n00000011, ... (1000 classes))" in str(e.value) and len(str(e.value)) < 300
    model, clf = (
        SimpleNamespace(in_channels=3, class_cond=True, num_real_classes=1000, class_names=n)
        for n in (names, names[1:] + names[:1])
    )
    with pytest.raises(RunError) as e:
        check_classifier(model, clf)
    assert str(e.value).count("(1000 classes)") == 2 and len(str(e.value)) < 500


def test_both_folder_locks_say_a_held_folder_in_one_line(tmp_path):
    """A run folder's lock file and a shared folder's lock on itself refuse a second process in
    the same words (the shared one said "another fastdiff process is writing into" instead)."""
    from fastdiff.files import locked_folder
    from fastdiff.runs.folder import exclusive_folder, shared_folder

    said = []
    for hold, take in (
        (lambda: exclusive_folder(tmp_path / "a", ""), lambda: exclusive_folder(tmp_path / "a", "x")),
        (lambda: locked_folder(tmp_path / "b"), lambda: shared_folder(tmp_path / "b", [])),
    ):
        with hold(), pytest.raises(RunError) as refused, take():
            pass
        said.append(str(refused.value).replace(str(tmp_path), "T"))
    assert said == [
        f"T/{n} is in use by another fastdiff process; wait for it or choose another --out" for n in "ab"
    ]


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_noted_as_work_starts(tmp_path, monkeypatch, capsys, emulated):
    """oneDNN emulates bf16 on an AVX2 CPU, 15-40x slower than fp32: such a run said nothing. The
    note comes once every check has passed, so a refused run's error stays its one line."""
    import torch

    from fastdiff.runs import device

    monkeypatch.setattr(device, "emulated_bf16", lambda dev: emulated)
    run = {**TINY, "num_samples": 2, "dtype": "bf16"}
    fastdiff.sample_run(tmp_path / "a", **run)
    assert capsys.readouterr().err.count("no native bf16") == emulated
    with pytest.raises(RunError, match="differs"):
        fastdiff.sample_run(tmp_path / "a", **run, seed=1, resume=True)
    assert "bf16" not in capsys.readouterr().err
    monkeypatch.undo()
    assert not device.emulated_bf16(torch.device("cuda"))
    assert device.emulated_bf16(torch.device("cpu")) is not torch.ops.mkldnn._is_mkldnn_bf16_supported()
