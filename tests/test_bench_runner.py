"""The benchmark plumbing behaves as pytest-benchmark users expect: settings checked before any
work, machine_info stable across runs on one machine, a report's command runnable as written."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import conftest, report, run_gpu, settings, timing

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, value",
    [("FASTDIFF_BENCH_THREADS", "x"), ("FASTDIFF_BENCH_TARGET_S", "nan"), ("FASTDIFF_BENCH_SIZE", "huge")],
)
def test_bad_setting_is_one_line_before_collection(name, value):
    env = {**os.environ, name: value}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: {name} must be" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "collected" not in proc.stdout


def test_run_gpu_checks_settings_before_its_stages(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIFF_BENCH_DEADLINE", "soon")
    monkeypatch.setattr(run_gpu, "install_wheels", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(SystemExit) as exit_info:
        run_gpu.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert not list(tmp_path.iterdir())


def test_settings_defaults(monkeypatch):
    for name in ("FASTDIFF_BENCH_THREADS", "FASTDIFF_BENCH_TARGET_S", "FASTDIFF_BENCH_DEADLINE"):
        monkeypatch.delenv(name, raising=False)
    settings.check()
    assert (settings.threads(), settings.target_s("cuda"), settings.deadline()) == (1, 0.05, None)


def test_machine_info_holds_no_measurement(monkeypatch):
    """--benchmark-compare warns when machine_info differs from the saved run's: the measured
    rates, different in every run, belong beside it."""
    counter = itertools.count()
    monkeypatch.setattr(timing, "reference_rates", lambda device: {"copy_gbps": next(counter)})
    infos = []
    for _ in range(2):
        info: dict = {}
        conftest.pytest_benchmark_update_machine_info(None, info)
        infos.append(info)
    assert infos[0] == infos[1]
    output: dict = {}
    conftest.pytest_benchmark_update_json(None, [], output)
    assert "copy_gbps" in output["fastdiff_rates"]


def test_report_command_runs_as_written(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BENCH_SIZE", "tiny")
    argv = ["bench/run_gpu.py", "--tag", "a b", "--", "-k", "fp16 and not compile"]
    monkeypatch.setattr(sys, "argv", argv)
    words = shlex.split(run_gpu._command())
    assert "FASTDIFF_BENCH_SIZE=tiny" in words
    assert words[words.index("python") + 1 :] == argv


def test_report_renders_under_an_ascii_locale(tmp_path):
    """A report's markdown (its dashes for missing values) is UTF-8 whatever the locale: under
    LC_ALL=C without Python's UTF-8 mode, rendering a committed report raised UnicodeEncodeError."""
    record = tmp_path / "r.json"
    record.write_bytes((REPO / "bench/results/2026-12-06-cpu-sampling-1thread.json").read_bytes())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "bench/report.py", str(record)], cwd=REPO, env=env, capture_output=True
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert "\u2014" in record.with_suffix(".md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "option",
    [["--threads", "abc"], ["--threads", "0"], ["--rounds", "0"], ["--engines", "x"], ["--busy", "-1"]],
)
def test_compare_original_refuses_bad_options_before_any_run(monkeypatch, tmp_path, option):
    """A typo used to surface as a child's traceback (or a NameError after the runs), after
    ``--busy``'s wait for the load."""
    from bench import compare_original

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process started"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a process started"))
    with pytest.raises(SystemExit) as exit_info:
        compare_original.main(["--guided-diffusion", str(tmp_path), "--busy", "1", *option])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "option", [["--steps", "0"], ["--warmup", "-1"], ["--batch-size", "x"], ["--jobs", "sample"], []]
)
def test_compare_train_refuses_bad_options_and_checkouts_before_any_training(tmp_path, option):
    """Options, and a folder that is no guided-diffusion checkout ([]: tmp_path), stop at once."""
    from bench import compare_train

    with pytest.raises(SystemExit) as exit_info:
        compare_train.main(["--guided-diffusion", str(tmp_path), "--out-dir", str(tmp_path), *option])
    assert exit_info.value.code == 2 and not list(tmp_path.iterdir())


def test_a_cpu_record_keeps_a_dotted_tag_in_its_file_names(tmp_path, capsys):
    """``--tag v1.2`` named the record <date>-cpu-e2e-v1.json/.md: Path.with_suffix took ".2" for
    a suffix, and a second tag "v1.3" overwrote the first."""
    from bench.machine import machine_info, write_record

    info = machine_info()
    write_record(tmp_path, "cpu-e2e", {"machine": info, "rows": []}, ["# title", "row"], "v1.2")
    stem = f"{info['date']}-cpu-e2e-v1.2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    assert json.loads((tmp_path / f"{stem}.json").read_text()) == {"machine": info, "rows": []}
    markdown = (tmp_path / f"{stem}.md").read_text(encoding="utf-8")
    assert markdown == "# title\nrow\n" == capsys.readouterr().out


def test_a_cpu_record_names_the_cpu_and_its_vector_instructions(monkeypatch):
    """Records from AVX2 and AVX512 machines sat side by side saying only "x86_64" (Linux's
    platform.processor() is empty): the README compares them by machine."""
    import platform

    from bench import machine

    monkeypatch.setattr(platform, "processor", lambda: "")
    cpu = machine.machine_info()["cpu"]
    assert torch.backends.cpu.get_cpu_capability() in cpu and platform.machine() in cpu
    assert cpu.startswith(machine._cpu_name())


@pytest.mark.parametrize("script", ["cpu_bound.py", "cpu_winograd.py"])
@pytest.mark.parametrize("option", [["--threads", "0"], ["--rounds", "0"]])
def test_cpu_studies_refuse_counts_below_one_before_measuring(tmp_path, script, option):
    cmd = [sys.executable, str(REPO / "bench" / script), *option, "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be at least 1" in r.stderr and not list(tmp_path.iterdir())


def test_cpu_bound_counts_the_step_as_fastdiff_runs_it():
    """Listing the step's convs leaves the step alone: the forward hooks cpu_bound listed them with
    made fastdiff run its upsamplers unfolded (3x3 convs on the upsampled image), so it counted
    16.07 GFLOP a step, 0.84 of them the unfolded upsamplers', and timed one of those convs."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cpu_bound import ConvLog, bundled_step

    unet, clf, _, (x, t, y) = bundled_step(1)

    def step():  # as cpu_bound counts it: FlopCounterMode cannot follow autograd.grad
        with torch.no_grad():
            unet(x, t, y=y)
        clf(x.clone().requires_grad_(True), t).logsumexp(-1).sum().backward()

    step()  # the upsamplers fold their weights once
    with FlopCounterMode(display=False) as alone:
        step()
    with FlopCounterMode(display=False) as listed, ConvLog() as log:
        step()
    assert listed.get_flop_counts()["Global"] == alone.get_flop_counts()["Global"]
    upsamplers = [key for key in log.counts if key[0] == "forward" and key[5]]  # transposed
    assert len(upsamplers) == 2 and all(key[2][2:] == (4, 4) for key in upsamplers)
    gradients = [key for key in log.counts if key[0] == "input gradient"]
    assert gradients and all(log.tensors[key][2] is not None for key in gradients)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("kron", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpu_winograd_computes_the_conv(m, kron, layout):
    """The study's Winograd is the conv it is timed against, on sizes that are no multiple of its
    tiles, again on the workspaces the first call kept, in the input's layout."""
    from bench.cpu_winograd import Winograd

    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3)
    winograd = Winograd(w, m, kron)
    for size in [(7, 9), (4, 5)]:
        x = torch.randn(2, 3, *size).contiguous(memory_format=layout)
        for _ in range(2):
            out = winograd(x)
            torch.testing.assert_close(out, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-4)
            assert (out.stride(1) == 1) == (layout == torch.channels_last)


def test_killed_stage_still_counts_its_tests():
    """A stage killed at its timeout prints no summary: the -v lines still give counts and names."""
    text = (
        "tests/test_a.py::test_x[fp16] PASSED  [ 10%]\n"
        "tests/test_a.py::test_y FAILED  [ 20%]\n"
        "tests/test_b.py::test_z SKIPPED (needs CUDA)  [ 30%]\n"
        "tests/test_b.py::test_w ERROR  [ 40%]\n"
        "tests/test_b.py::test_v "
    )
    assert run_gpu.outcome_counts(text) == {"passed": 1, "failed": 1, "skipped": 1, "errors": 1}
    assert run_gpu.failed_tests(text) == ["tests/test_a.py::test_y", "tests/test_b.py::test_w"]
    summary = text + "\nFAILED tests/test_a.py::test_y - boom\n1 failed, 1 passed in 3.0s\n"
    assert run_gpu.outcome_counts(summary) == {"failed": 1, "passed": 1}
    assert run_gpu.failed_tests(summary) == ["tests/test_a.py::test_y"]


def test_run_logged_copies_while_running_and_kills_at_timeout(monkeypatch, tmp_path):
    monkeypatch.setattr(run_gpu, "TICK_S", 0.2)
    ticks = []
    # sh, not Python: the 1.5 s must hold the start of what prints "started" on a loaded machine
    cmd = ["sh", "-c", "echo started; exec sleep 30"]
    rc, text = run_gpu.run_logged(cmd, tmp_path / "log", timeout=1.5, tick=lambda: ticks.append(1))
    assert rc is None and "started" in text and ticks
    rc, _ = run_gpu.run_logged([sys.executable, "-c", "pass"], tmp_path / "log2", timeout=30)
    assert rc == 0


def test_failed_build_stage_turns_the_jit_build_off(monkeypatch, tmp_path):
    """Each later process would otherwise try the failed (or timed-out) build again."""
    from types import SimpleNamespace

    # set first, so monkeypatch records the variable and undoes the stage's setting afterwards
    # (delenv of an absent one records nothing: the "0" leaked into the worker's later tests)
    monkeypatch.setenv("FASTDIFF_CUDA_JIT", "")
    monkeypatch.delenv("FASTDIFF_CUDA_JIT")
    args = SimpleNamespace(build_timeout=100)
    calls = []

    def fake_run(cmd, logfile, timeout, env=None, tick=None):
        calls.append(cmd)
        return (0, "cuda extension: loaded\n") if len(calls) == 1 else (None, "")

    monkeypatch.setattr(run_gpu, "run_logged", fake_run)
    assert run_gpu.stage_build(args, tmp_path, time.time() + 400)["status"] == "loaded"
    assert "FASTDIFF_CUDA_JIT" not in os.environ
    assert run_gpu.stage_build(args, tmp_path, time.time() + 400)["status"] == "build timed out"
    assert os.environ["FASTDIFF_CUDA_JIT"] == "0"


def test_out_gets_few_files_after_every_stage(monkeypatch, tmp_path):
    """The device tool brings back at most 8 files from $OUT, and only what is there when the
    command ends: the report goes there after each stage, the raw files as one archive, and a
    report that fails to render still leaves its JSON."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(run_gpu.tempfile, "mkdtemp", lambda prefix: str(work))
    seen = []

    def stage(name, files):
        def run(*args, **kwargs):
            for f in files:
                (work / f).write_text("{}\n" if f.endswith("jsonl") else "log\n")
            seen.append(sorted(p.name for p in out.iterdir()) if out.exists() else [])
            if name == "tests":  # the report so far (build stage done) renders as it stands
                partial = json.loads(next(out.glob("*.json")).read_text())
                assert partial["complete"] is False and "GPU tests: not run" in report.markdown(partial)
            outcome = {"counts": {}, "failed": [], "timed_out": False, "records": 0, "skipped_for_budget": 0}
            return {**outcome, "status": name, "seconds": 1.0}

        return run

    monkeypatch.setattr(run_gpu, "install_wheels", lambda *a: [])
    build = stage("build", ["build.log", "build-unlock.log", "wheels.log"])
    monkeypatch.setattr(run_gpu, "stage_build", build)
    monkeypatch.setattr(run_gpu, "stage_tests", stage("tests", ["tests.log"]))
    bench = stage("bench", ["bench.log", "records.jsonl", "pytest-benchmark.json"])
    monkeypatch.setattr(run_gpu, "stage_bench", lambda *a, **k: (bench(), [], {}))
    monkeypatch.setattr(run_gpu, "render", lambda *a: 1 / 0)
    run_gpu.main(["--dry-run", "--out-dir", str(work)])
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and run_gpu.RAW_ARCHIVE in names and any(n.endswith(".json") for n in names)
    assert run_gpu.RAW_ARCHIVE in seen[1] and any(n.endswith(".json") for n in seen[1])  # after build
    with tarfile.open(out / run_gpu.RAW_ARCHIVE) as tar:
        assert {"raw/tests.log", "raw/records.jsonl", "raw/wheels.log"} <= set(tar.getnames())


def test_records_carry_each_benchmarks_wall_time(monkeypatch, tmp_path):
    """The next GPU run's budget is planned from these: compiles and autotuning included."""
    from types import SimpleNamespace

    path = tmp_path / "records.jsonl"
    monkeypatch.setenv("FASTDIFF_BENCH_RECORDS", str(path))
    monkeypatch.setattr(timing, "TEST_STARTED", time.time() - 2.0)
    bench = SimpleNamespace(name="b", fullname="f::b", group=None, stats=None)
    timing._record(bench, {"op": "attention"})
    assert json.loads(path.read_text())["wall_s"] >= 2.0


def test_gpu_tests_run_graph_captures_first_and_compiles_last():
    """run_gpu.py's test stage is cut at its time limit: what is left is the compiles."""
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "--collect-only"]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    compiles = [i for i, n in enumerate(ids) if "compile" in n.split("::")[-1]]
    graphs = [i for i, n in enumerate(ids) if i not in compiles and ("graph" in n or "capture" in n)]
    assert compiles and graphs
    assert compiles == list(range(len(ids) - len(compiles), len(ids)))
    assert graphs == list(range(len(graphs)))


def test_bench_runs_the_issue_targets_first_and_cold_compiles_late():
    """The GPU run's benchmark stage is cut at its deadline: the targets' rows (guided DDIM-25 at
    ImageNet-256 against the original, the UNet's MFU there) come before every kernel row, the
    compiled baseline of the 1.5x target right after the fp16 kernels at batch 8, and the other
    torch.compile builds after every fp16 kernel row."""
    import torch

    from bench import shapes

    fp16 = [shapes.priority(shapes.GNCase(256, 32, 32, b, torch.float16)) for b in (8, 64, 1)]
    others = [shapes.priority(shapes.GNCase(256, 32, 32, 8, dt)) for dt in (torch.bfloat16, torch.float32)]
    targets = [shapes.sampling_priority("imagenet256", impl, mode) for impl, mode in shapes.TARGET_ROWS]
    assert max(targets) < min(fp16 + others)
    assert fp16[0] < shapes.sampling_priority("imagenet256", "gd-compile", "loop") < fp16[1]
    late = [shapes.sampling_priority(n, "compile", "loop") for n in ("imagenet256", "imagenet64")]
    assert max(fp16) < min(late + [shapes.sampling_priority("imagenet64", "gd-compile", "loop")])
    assert shapes.sampling_priority("imagenet64", "graph", "loop") < min(late)
