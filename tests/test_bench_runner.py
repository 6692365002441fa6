"""The benchmark plumbing behaves as pytest-benchmark users expect: settings checked before any
work, machine_info stable across runs on one machine, a report's command runnable as written."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench import conftest, run_gpu, settings, timing

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


@pytest.mark.parametrize("option", [["--threads", "0"], ["--rounds", "0"]])
def test_cpu_bound_refuses_counts_below_one_before_measuring(tmp_path, option):
    cmd = [sys.executable, str(REPO / "bench" / "cpu_bound.py"), *option, "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be at least 1" in r.stderr and not list(tmp_path.iterdir())
