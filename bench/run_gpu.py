#!/usr/bin/env python
"""Run the whole GPU suite in one call (under 10 minutes) and write the results.

Stages: (0) load/build the optional CUDA extension, (1) ``pytest tests -m gpu`` (pass/fail
counts), (2) ``pytest bench --benchmark-only`` (pytest-benchmark, plus a
``triton.testing.do_bench`` timing of every case taken in the same process so the torch.compile
baselines are built once), (3) the report:
``bench/results/<date>-<gpu>.json``, ``.md`` (per shape: times, speedups, GB/s, % of copy
bandwidth, the issue's targets met / not met) and ``.png``; everything is also copied to
``$OUT`` when set. The benchmarks run in priority order (the issue's targets first) under a deadline, so a
short budget cuts the least important cases, never the report.

    python bench/run_gpu.py                      # on the GPU machine
    FASTDIFF_BENCH_SIZE=tiny python bench/run_gpu.py --dry-run   # CPU rehearsal, temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import TARGETS, build_rows, render, summarise, summary_lines  # noqa: E402

REPORT_RESERVE_S = 25  # kept back from the benchmarks for writing the report
TICK_S = 60  # while a stage runs, what it has written so far is copied to $OUT this often
RAW_ARCHIVE = "raw.tar.gz"  # the logs, records and benchmark JSON, one file in $OUT


def _command() -> str:
    """This run's command line with the FASTDIFF_BENCH_* settings it ran under (the report says
    how to get its numbers again)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("FASTDIFF_BENCH_")]
    return " ".join([*env, "python", "bench/run_gpu.py", *map(shlex.quote, sys.argv[1:])])


def log(msg: str) -> None:
    print(f"[run_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_logged(
    cmd: list[str], logfile: Path, timeout: float, env: dict | None = None, tick=None
) -> tuple[int | None, str]:
    """Run cmd with output to logfile; (returncode or None on timeout, output text).

    The command gets its own process group so a timeout also ends what it started (nvcc,
    inductor compile workers). ``tick()``, if given, runs every TICK_S seconds while it runs
    (the runner copies what is there so far to $OUT)."""
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        end = time.time() + max(timeout, 1)
        rc = None
        while rc is None:
            try:
                rc = proc.wait(timeout=max(0.1, min(TICK_S, end - time.time())))
            except subprocess.TimeoutExpired:
                if time.time() >= end:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                if tick is not None:
                    tick()
    return rc, logfile.read_text(errors="replace")


def pytest_counts(text: str) -> dict:
    """The counts of pytest's final summary line ("3 passed, 1 failed, 2 skipped in 4.2s")."""
    counts: dict[str, int] = {}
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|deselected)\b", ln)]
    for n, word in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1] if lines else ""
    ):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


def failed_tests(text: str) -> list[str]:
    """Failed or erroring test ids: the -rfE summary's, else (a run killed at its timeout prints
    no summary) the per-test lines of -v output."""
    summary = [m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.M)]
    if summary:
        return summary
    return list(dict.fromkeys(m.group(1) for m in re.finditer(r"^(\S+::\S+) (?:FAILED|ERROR)\b", text, re.M)))


def outcome_counts(text: str) -> dict:
    """The counts of pytest's summary line or, without one (killed at its timeout), of the
    per-test lines of -v output."""
    counts = pytest_counts(text)
    if counts:
        return counts
    for word in re.findall(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M):
        key = {"ERROR": "errors", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(word, word.lower())
        counts[key] = counts.get(key, 0) + 1
    return counts


def skip_reasons(text: str) -> dict[str, int]:
    reasons: dict[str, int] = defaultdict(int)
    for n, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", text, re.M):
        reasons[reason.strip()] += int(n)
    return dict(reasons)


BUILD_SNIPPET = """
try:
    from fastdiff.ops._cuda_build import load_extension
except ImportError:
    print("cuda extension: no loader")
else:
    print("cuda extension:", "loaded" if load_extension() is not None else "unavailable")
"""
# torch.utils.cpp_extension's build lock for the extension _cuda_build loads ("fastdiff_cuda").
LOCK_SNIPPET = """
from pathlib import Path
from torch.utils.cpp_extension import _get_build_directory
lock = Path(_get_build_directory("fastdiff_cuda", False)) / "lock"
lock.unlink(missing_ok=True)
print("removed", lock)
"""


def install_wheels(folder: Path | None, workdir: Path) -> list[str]:
    """Wheels the GPU image lacks (xformers for the gd-xformers baseline), carried in ``folder``:
    installed into the work dir, no index, no dependencies, and put first on the path of every
    stage. A wheel that does not install is logged, not fatal: only its rows go missing."""
    wheels = sorted(folder.glob("*.whl")) if folder is not None and folder.is_dir() else []
    if not wheels:
        return []
    target = workdir / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    rc, text = run_logged([*cmd, "--target", str(target), *map(str, wheels)], workdir / "wheels.log", 120)
    if rc != 0:
        log(f"wheels from {folder} did not install (see wheels.log): {text.strip().splitlines()[-1:]}")
        return []
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(target))
    log(f"installed {', '.join(w.name for w in wheels)}")
    return [w.name for w in wheels]


def read_records(path: Path) -> list[dict]:
    """The benchmarks' JSON lines; a line cut off by a killed process is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def publish(workdir: Path, report_files: list[Path]) -> None:
    """Copy the report files and one archive of the work dir's raw files (logs, records, the
    benchmark JSON) to $OUT, when set: the device tool brings back at most 8 files, and only what
    is in $OUT when its command ends, so this runs after every stage and every TICK_S seconds."""
    out_env = os.environ.get("OUT")
    if not out_env:
        return
    dest = Path(out_env)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for f in report_files:
            if f.is_file():
                shutil.copy2(f, dest / f.name)
        tmp = dest / (RAW_ARCHIVE + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(workdir.iterdir()):
                if f.is_file() and f not in report_files:
                    tar.add(f, arcname=f"raw/{f.name}")
        tmp.replace(dest / RAW_ARCHIVE)
    except Exception as e:  # (OSError, tarfile.TarError): a failed copy must not end the run
        log(f"could not copy the results to {dest}: {type(e).__name__}: {e}")


def stage_build(args, workdir: Path, deadline: float) -> dict:
    """Load (JIT-building if needed) the optional CUDA extension once, so its build time shows
    up here and not inside the first test or benchmark that happens to touch it."""
    timeout = min(args.build_timeout, 0.4 * (deadline - time.time()))
    log(f"stage 0: load/build the CUDA extension (timeout {timeout:.0f}s)")
    t0 = time.time()
    rc, text = run_logged([sys.executable, "-c", BUILD_SNIPPET], workdir / "build.log", timeout)
    status = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("cuda extension:")), None
    )
    if rc is None:
        # A killed build leaves torch's lock file behind and every later load would wait on it.
        run_logged([sys.executable, "-c", LOCK_SNIPPET], workdir / "build-unlock.log", 60)
        status = "build timed out"
    result = {"returncode": rc, "seconds": round(time.time() - t0, 1), "status": status or "error"}
    log(f"cuda extension: {result['status']} in {result['seconds']}s")
    if result["status"] != "loaded":
        # Every later process would try the same build again (a compile error's minutes, or a
        # timed-out build resumed) at its first GroupNorm: the Triton kernels run instead.
        os.environ["FASTDIFF_CUDA_JIT"] = "0"
    return result


def stage_tests(args, workdir: Path, deadline: float, tick=None) -> dict:
    if args.skip_tests:
        return {"skipped": True}
    timeout = min(args.tests_timeout, 0.4 * (deadline - time.time()))
    log(f"stage 1: pytest tests -m gpu (timeout {timeout:.0f}s)")
    t0 = time.time()
    # -v: one line per test as it ends, so a stage killed at its timeout still says what ran
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfE"]
    cmd += ["--durations=15"]
    rc, text = run_logged(cmd, workdir / "tests.log", timeout, tick=tick)
    result = {
        "returncode": rc,
        "timed_out": rc is None,
        "seconds": round(time.time() - t0, 1),
        "counts": outcome_counts(text),
        "failed": failed_tests(text)[:50],
    }
    log(f"tests: {result['counts']} in {result['seconds']}s" + (" (TIMED OUT)" if rc is None else ""))
    return result


def stage_bench(args, workdir: Path, deadline: float, size: str, tick=None) -> tuple[dict, list[dict], dict]:
    records_path = workdir / "records.jsonl"
    json_path = workdir / "pytest-benchmark.json"
    plugin = (
        importlib.util.find_spec("pytest_benchmark") is not None
        and os.environ.get("FASTDIFF_BENCH_FALLBACK") != "1"
    )
    # -v: one line per benchmark as it starts and ends (a killed run shows what was in flight)
    cmd = [sys.executable, "-m", "pytest", "bench", "-v", "-p", "no:cacheprovider", "-rsfE"]
    if not plugin:
        cmd += ["-p", "no:benchmark"]
    else:
        cmd += ["--benchmark-only", f"--benchmark-json={json_path}", "--benchmark-columns=median,rounds"]
    cmd += args.pytest_args
    env = dict(os.environ)
    env.update(
        FASTDIFF_BENCH_SIZE=size,
        FASTDIFF_BENCH_RECORDS=str(records_path),
        FASTDIFF_BENCH_DEADLINE=str(deadline - REPORT_RESERVE_S),
    )
    timeout = deadline - 10 - time.time()
    log(
        f"stage 2: pytest bench (size {size}, "
        f"pytest-benchmark {'yes' if plugin else 'NO: fallback fixture'}, "
        f"deadline in {deadline - REPORT_RESERVE_S - time.time():.0f}s)"
    )
    t0 = time.time()
    rc, text = run_logged(cmd, workdir / "bench.log", timeout, env=env, tick=tick)
    records = read_records(records_path)
    rates = {}
    try:  # written at the session's end: absent, or cut short, when the run was killed
        data = json.loads(json_path.read_text()) if json_path.exists() else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        rates = data.get("fastdiff_rates", {})
        if not records:
            records = [
                {
                    "name": b["name"],
                    "group": b.get("group"),
                    "stats": b["stats"],
                    "extra_info": b["extra_info"],
                }
                for b in data.get("benchmarks", [])
            ]
    reasons = skip_reasons(text)
    result = {
        "returncode": rc,
        "timed_out": rc is None,
        "seconds": round(time.time() - t0, 1),
        "pytest_benchmark": plugin,
        "counts": outcome_counts(text),
        "failed": failed_tests(text)[:100],
        "skip_reasons": reasons,
        "records": len(records),
        "skipped_for_budget": sum(n for r, n in reasons.items() if "budget" in r),
    }
    log(
        f"bench: {result['counts']}, {len(records)} records in {result['seconds']}s"
        + (" (TIMED OUT)" if rc is None else "")
    )
    return result, records, rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="rehearsal: tiny sizes (unless FASTDIFF_BENCH_SIZE says "
        "otherwise), results to a temp dir, never into bench/results",
    )
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    p.add_argument(
        "--tests-timeout", type=float, default=180, help="cap for the GPU test stage (default 180)"
    )
    p.add_argument(
        "--build-timeout", type=float, default=240, help="cap for building the CUDA extension (default 240)"
    )
    p.add_argument("--skip-tests", action="store_true", help="skip `pytest tests -m gpu`")
    p.add_argument(
        "--wheels",
        type=Path,
        default=REPO / ".whl",
        help="a folder of wheels to install first, e.g. xformers (default .whl, where it exists)",
    )
    p.add_argument(
        "--out-dir", type=Path, help="where to write the report (default bench/results, or a temp dir)"
    )
    p.add_argument("--tag", default="", help="report name suffix: <date>-<device>-TAG")
    p.add_argument(
        "pytest_args", nargs="*", help="extra arguments for the bench pytest run (after --), e.g. -k fp16"
    )
    args = p.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget

    import torch

    from bench import settings, timing

    try:
        settings.check()
    except ValueError as e:
        p.error(str(e))

    cuda = torch.cuda.is_available()
    size = os.environ.get("FASTDIFF_BENCH_SIZE") or ("tiny" if args.dry_run or not cuda else "full")
    info = timing.device_info()
    date = dt.date.today().isoformat()
    stem = f"{date}-{slug(info.get('gpu_name') or 'cpu')}" + (f"-{slug(args.tag)}" if args.tag else "")
    workdir = Path(tempfile.mkdtemp(prefix="fastdiff-bench-"))
    if args.out_dir:
        out_dir = args.out_dir
    elif args.dry_run or not cuda:
        out_dir = workdir  # CPU numbers never land in bench/results
    else:
        out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"device {info.get('gpu_name') or 'cpu'}; torch {info['torch_version']}, "
        f"triton {info['triton_version']}; "
        f"size {size}; budget {args.budget:.0f}s; work dir {workdir}"
    )

    wheels = install_wheels(args.wheels, workdir)
    json_path = out_dir / f"{stem}.json"
    state: dict = {"build": None, "tests": None, "bench": None, "records": [], "rates": {}}
    written: list[Path] = []

    def write_report(final: bool) -> None:
        """The report as it stands (after each stage; markdown and plot at the end), then a copy
        to $OUT: a run cut short, or a report that fails to render, still leaves its results."""
        records = state["records"] or read_records(workdir / "records.jsonl")
        rates = dict(state["rates"])
        try:
            rows = build_rows(records)
            for r in records:
                e = r["extra_info"]
                rates.setdefault("copy_gbps", e.get("copy_gbps"))
                if e.get("matmul_tflops"):
                    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(e["dtype"], e["dtype"])
                    rates.setdefault(f"matmul_tflops_{dtype}", e["matmul_tflops"])
            summary = summarise(rows)
        except Exception as e:  # the raw records still go to $OUT
            log(f"could not tabulate the records: {type(e).__name__}: {e}")
            rows, summary = [], []
        report = {
            "schema": 1,
            "date": date,
            "stem": stem,
            "dry_run": args.dry_run,
            "complete": final,
            "command": _command(),
            "size": size,
            "budget_s": args.budget,
            "elapsed_s": round(time.time() - t_start, 1),
            "device": info,
            "wheels": wheels,
            "cuda_extension": state["build"],
            "rates": {k: v for k, v in rates.items() if k.startswith(("copy", "matmul"))},
            "tests": state["tests"],
            "bench": state["bench"],
            "targets": {k: {"op": o, "metric": m, "threshold": t} for k, (o, m, t) in TARGETS.items()},
            "summary": summary,
            "rows": rows,
            "records": [r for r in records if r.get("extra_info", {}).get("op") == "sampling"],
        }
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        written[:] = [json_path]
        if final:
            try:
                written.extend(render(report, json_path))
            except Exception as e:
                log(f"could not render the report: {type(e).__name__}: {e}")
            state["summary"] = summary
        publish(workdir, written)

    def tick() -> None:
        publish(workdir, written)

    state["build"] = stage_build(args, workdir, deadline)
    write_report(final=False)
    state["tests"] = stage_tests(args, workdir, deadline, tick=tick)
    write_report(final=False)
    state["bench"], state["records"], state["rates"] = stage_bench(args, workdir, deadline, size, tick=tick)
    write_report(final=True)
    if os.environ.get("OUT"):
        log(f"copied results to {os.environ['OUT']}")

    tests, bench_result = state["tests"], state["bench"]
    log("wrote " + ", ".join(str(f) for f in written))
    print()
    print(
        f"tests: {tests.get('counts', 'skipped')}   bench: {bench_result['counts']}   "
        f"({bench_result['skipped_for_budget']} skipped for budget)   wall {time.time() - t_start:.0f}s"
    )
    print("\n".join(summary_lines(state["summary"])))
    ok = not tests.get("failed") and not bench_result["failed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
