#!/usr/bin/env python
"""Run the whole GPU suite in one call (under 10 minutes) and write the results.

Stages: (0) load/build the optional CUDA extension, (1) ``pytest tests -m gpu`` (pass/fail
counts), (2) ``pytest bench --benchmark-only`` (pytest-benchmark, plus a
``triton.testing.do_bench`` timing of every case taken in the same process so the torch.compile
baselines are built once), (3) the report:
``bench/results/<date>-<gpu>.json``, ``.md`` (per shape: times, speedups, GB/s, % of copy
bandwidth, the issue's targets met / not met) and ``.png``; everything is also copied to
``$OUT`` when set. The benchmarks run in priority order (fp16 first) under a deadline, so a
short budget cuts the least important cases, never the report.

    python bench/run_gpu.py                      # on the GPU machine
    FASTDIFF_BENCH_SIZE=tiny python bench/run_gpu.py --dry-run   # CPU rehearsal, temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The targets: name -> (op, metric, threshold).
TARGETS = {
    ">=80% copy bw": ("ada_group_norm", "pct_copy", 80.0),
    ">=3x eager": ("ada_group_norm", "eager", 3.0),
    ">=1.3x compile": ("ada_group_norm", "compile", 1.3),
    ">=1.2x SDPA": ("attention", "sdpa", 1.2),
}
BASELINES = {"ada_group_norm": ("eager", "compile"), "attention": ("eager", "compile", "sdpa")}
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = ("fp16", "bf16", "fp32")
REPORT_RESERVE_S = 25  # kept back from the benchmarks for writing the report


def log(msg: str) -> None:
    print(f"[run_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_logged(
    cmd: list[str], logfile: Path, timeout: float, env: dict | None = None
) -> tuple[int | None, str]:
    """Run cmd with output to logfile; (returncode or None on timeout, output text).

    The command gets its own process group so a timeout also ends what it started (nvcc,
    inductor compile workers)."""
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
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
    return [m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.M)]


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
    return result


def stage_tests(args, workdir: Path, deadline: float) -> dict:
    if args.skip_tests:
        return {"skipped": True}
    timeout = min(args.tests_timeout, 0.4 * (deadline - time.time()))
    log(f"stage 1: pytest tests -m gpu (timeout {timeout:.0f}s)")
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE"]
    rc, text = run_logged(cmd, workdir / "tests.log", timeout)
    result = {
        "returncode": rc,
        "timed_out": rc is None,
        "seconds": round(time.time() - t0, 1),
        "counts": pytest_counts(text),
        "failed": failed_tests(text)[:50],
    }
    log(f"tests: {result['counts']} in {result['seconds']}s" + (" (TIMED OUT)" if rc is None else ""))
    return result


def stage_bench(args, workdir: Path, deadline: float, size: str) -> tuple[dict, list[dict], dict]:
    records_path = workdir / "records.jsonl"
    json_path = workdir / "pytest-benchmark.json"
    plugin = (
        importlib.util.find_spec("pytest_benchmark") is not None
        and os.environ.get("FASTDIFF_BENCH_FALLBACK") != "1"
    )
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "-rsfE"]
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
    rc, text = run_logged(cmd, workdir / "bench.log", timeout, env=env)
    records = []
    if records_path.exists():
        records = [json.loads(ln) for ln in records_path.read_text().splitlines() if ln.strip()]
    machine = {}
    if json_path.exists():
        data = json.loads(json_path.read_text())
        machine = data.get("machine_info", {})
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
        "counts": pytest_counts(text),
        "failed": failed_tests(text)[:100],
        "skip_reasons": reasons,
        "records": len(records),
        "skipped_for_budget": sum(n for r, n in reasons.items() if "budget" in r),
    }
    log(
        f"bench: {result['counts']}, {len(records)} records in {result['seconds']}s"
        + (" (TIMED OUT)" if rc is None else "")
    )
    return result, records, machine


def _ratio(base, fast):
    return base / fast if base and fast else None


def build_rows(records: list[dict]) -> list[dict]:
    """One row per (op, case, mode): each implementation's time from both timers, and the metrics."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for rec in records:
        e = rec["extra_info"]
        if e.get("op") not in BASELINES:  # the sampling benchmarks have their own table
            continue
        groups[(e["op"], e["case"], e["mode"])][e["impl"]] = e
    rows = []
    for (op, case, mode), impls in groups.items():
        any_e = next(iter(impls.values()))
        fd = impls.get("fastdiff", {})
        if op == "ada_group_norm":
            shape = f"{any_e['channels']}x{any_e['height']}x{any_e['width']}"
        else:
            shape = (
                f"C{any_e['channels']} {any_e['heads']}x{any_e['head_dim']} "
                f"T{any_e['length']} {any_e['order']}"
            )
        row = {
            "op": op,
            "case": case,
            "mode": mode,
            "shape": shape,
            "batch": any_e["batch"],
            "dtype": any_e["dtype"],
            "models": any_e.get("models", []),
            "bytes": any_e["bytes"],
            "flops": any_e.get("flops"),
            "copy_gbps": any_e.get("copy_gbps"),
            "matmul_tflops": any_e.get("matmul_tflops"),
            "fastdiff_path": fd.get("fastdiff_path"),
        }
        for timer, field in (("kernel", "kernel_s"), ("pytest", "median_s")):
            times = {impl: e.get(field) for impl, e in impls.items()}
            t = times.get("fastdiff")
            m = {"times": times, "speedup": {b: _ratio(times.get(b), t) for b in BASELINES[op]}}
            if t:
                m["gbps"] = row["bytes"] / t / 1e9
                m["pct_copy"] = 100 * m["gbps"] / row["copy_gbps"] if row["copy_gbps"] else None
                if row["flops"]:
                    m["tflops"] = row["flops"] / t / 1e12
                    m["pct_matmul"] = (
                        100 * m["tflops"] / row["matmul_tflops"] if row["matmul_tflops"] else None
                    )
            row[timer] = m
        row["targets"] = judge(row)
        rows.append(row)
    order = {"ada_group_norm": 0, "attention": 1}
    rows.sort(
        key=lambda r: (
            order[r["op"]],
            MODES.index(r["mode"]),
            DTYPES.index(r["dtype"]),
            r["batch"],
            r["bytes"],
        )
    )
    return rows


def judge(row: dict) -> dict:
    """Each target of the row's op: True/False (met), None (not measured). The do_bench timer
    decides when it timed both sides; otherwise pytest-benchmark's median."""
    out = {}
    for name, (op, metric, threshold) in TARGETS.items():
        if op != row["op"]:
            continue
        value = None
        for timer in ("kernel", "pytest"):
            m = row[timer]
            value = m.get(metric) if metric == "pct_copy" else m["speedup"].get(metric)
            if value is not None:
                break
        out[name] = None if value is None else bool(value >= threshold)
    return out


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for op in BASELINES:
        for mode in MODES:
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            if not sel:
                continue
            timer = lambda r: r["kernel"] if r["kernel"]["times"].get("fastdiff") else r["pytest"]  # noqa: E731
            s = {"op": op, "mode": mode, "rows": len(sel)}
            for b in BASELINES[op]:
                s[f"geomean_x_{b}"] = geomean(timer(r)["speedup"].get(b) for r in sel)
            pcts = [timer(r).get("pct_copy") for r in sel if timer(r).get("pct_copy") is not None]
            s["median_pct_copy"] = sorted(pcts)[len(pcts) // 2] if pcts else None
            for name in sel[0]["targets"]:
                judged = [r["targets"][name] for r in sel if r["targets"][name] is not None]
                s[name] = f"{sum(judged)}/{len(judged)}"
            out.append(s)
    return out


def fmt_time(s) -> str:
    if not s:
        return "—"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def fmt(v, spec=".2f", suffix="") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def mark(v) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[v]


def table(rows: list[dict], op: str, timer: str) -> list[str]:
    base = BASELINES[op]
    names = {"eager": "eager", "compile": "compile", "sdpa": "SDPA"}
    head = [
        "shape",
        "batch",
        "dtype",
        "mode",
        "fastdiff",
        *[names[b] for b in base],
        *[f"x {names[b]}" for b in base],
        "GB/s",
        "% copy bw",
    ]
    if op == "attention":
        head += ["TFLOP/s", "% matmul"]
    targets = [n for n, (o, _, _) in TARGETS.items() if o == op]
    head += targets
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["op"] != op:
            continue
        m = r[timer]
        shape = f"{r['shape']} ({'/'.join(r['models'])})" if r["models"] else r["shape"]
        cells = [shape, str(r["batch"]), r["dtype"], r["mode"], fmt_time(m["times"].get("fastdiff"))]
        cells += [fmt_time(m["times"].get(b)) for b in base]
        cells += [fmt(m["speedup"].get(b), ".2f", "x") for b in base]
        cells += [fmt(m.get("gbps"), ".3g"), fmt(m.get("pct_copy"), ".3g", "%")]
        if op == "attention":
            cells += [fmt(m.get("tflops"), ".3g"), fmt(m.get("pct_matmul"), ".3g", "%")]
        cells += [mark(r["targets"][t]) for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    d, rates, rows = report["device"], report["rates"], report["rows"]
    title = d.get("gpu_name") or f"CPU ({d.get('cpu_count')} cores)"
    md = [f"# fastdiff benchmarks: {title}, {report['date']}", ""]
    md += [
        f"- torch {d.get('torch_version')}, triton {d.get('triton_version')}, CUDA {d.get('cuda_version')}, "
        f"driver {d.get('gpu_driver_version')}, Python {d.get('python_version')}",
        f"- measured copy bandwidth {fmt(rates.get('copy_gbps'), '.4g')} GB/s; matmul fp16 "
        f"{fmt(rates.get('matmul_tflops_float16'), '.4g')} / "
        f"bf16 {fmt(rates.get('matmul_tflops_bfloat16'), '.4g')} TFLOP/s",
        f"- size `{report['size']}`, budget {report['budget_s']:.0f}s, wall {report['elapsed_s']:.0f}s"
        + (" (dry run)" if report["dry_run"] else ""),
    ]
    ext = report["cuda_extension"]
    md.append(f"- CUDA extension (csrc/): {ext['status']} ({ext['seconds']}s)")
    t = report["tests"]
    if not t.get("skipped"):
        md.append(
            f"- GPU tests (`pytest tests -m gpu`): {t['counts']}" + (" TIMED OUT" if t["timed_out"] else "")
        )
        md += [f"  - failed: `{n}`" for n in t["failed"][:20]]
    b = report["bench"]
    md.append(
        f"- benchmarks: {b['counts']}, {b['records']} timed; "
        f"{b['skipped_for_budget']} skipped for the time budget" + (" TIMED OUT" if b["timed_out"] else "")
    )
    md += [f"  - failed: `{n}`" for n in b["failed"][:20]]
    md += ["", "## Summary (geometric means over shapes; targets: rows met / rows measured)", ""]
    md += summary_lines(report["summary"])
    timer = "kernel" if any(r["kernel"]["times"].get("fastdiff") for r in rows) else "pytest"
    kernel_name = (
        "triton.testing.do_bench median, L2 flushed" if d.get("cuda_available") else "perf_counter median"
    )
    for title_, tm in (
        (f"kernel timer ({kernel_name})", "kernel"),
        ("pytest-benchmark median (each call ends with a device synchronise)", "pytest"),
    ):
        if tm == "kernel" and timer != "kernel":
            continue
        for op in BASELINES:
            if any(r["op"] == op for r in rows):
                md += ["", f"## {op}: {title_}", ""] + table(rows, op, tm)
    sampling = sampling_lines(report.get("records", []))
    if sampling:
        md += [
            "",
            "## Guided sampling (bench/test_bench_sampling.py, pytest-benchmark medians)",
            "",
        ] + sampling
    md += [
        "",
        "Speedups are baseline time / fastdiff time. GB/s counts every tensor read once and written once "
        "(the minimum traffic), so it is comparable across implementations; % copy bw is against the "
        "measured `y.copy_(x)` bandwidth. Targets are judged on the kernel timer when it timed both "
        "sides, else on the pytest-benchmark median.",
        "",
    ]
    return "\n".join(md)


SAMPLING_IMPLS = ("gd", "gd-compile", "eager", "compile", "graph")
FASTDIFF_ENGINES = ("eager", "compile", "graph")


def sampling_lines(records: list[dict]) -> list[str]:
    """bench/test_bench_sampling.py: seconds per implementation, the best fastdiff engine's speedup
    over guided-diffusion's semantics and its torch.compile, and the issue's targets (guided loop at
    ImageNet-256 batch 8: >= 4x gd, >= 1.5x gd-compile; UNet forward there: >= 60% MFU)."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for rec in records:
        e = rec["extra_info"]
        if e.get("op") == "sampling":
            groups[(e["case"], e["batch"], e["mode"])][e["impl"]] = {**e, "s": rec["stats"].get("median")}
    if not groups:
        return []
    head = [
        "case",
        "batch",
        "mode",
        *SAMPLING_IMPLS,
        "best engine",
        "x gd",
        "x gd-compile",
        "images/s",
        "MFU %",
        "warm-up s (best)",
        "target",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, batch, mode), impls in sorted(groups.items()):
        times = {k: v["s"] for k, v in impls.items() if v.get("s")}
        best = min((k for k in FASTDIFF_ENGINES if k in times), key=times.get, default=None)
        fast = times.get(best)
        x_gd, x_gc = _ratio(times.get("gd"), fast), _ratio(times.get("gd-compile"), fast)
        b = impls.get(best, {})
        target = "n/a"
        if case == "imagenet256" and mode == "loop" and x_gd is not None:
            target = mark(x_gd >= 4 and (x_gc is None or x_gc >= 1.5))
        elif case == "imagenet256" and mode == "unet" and b.get("mfu_pct") is not None:
            target = mark(b["mfu_pct"] >= 60)
        out.append(
            "| "
            + " | ".join(
                [
                    case,
                    str(batch),
                    mode,
                    *(fmt_time(times.get(k)) for k in SAMPLING_IMPLS),
                    best or "-",
                    fmt(x_gd),
                    fmt(x_gc),
                    fmt(b.get("images_per_s"), ".3g"),
                    fmt(b.get("mfu_pct"), ".1f"),
                    fmt(b.get("warmup_s"), ".1f"),
                    target,
                ]
            )
            + " |"
        )
    return out


def summary_lines(summary: list[dict]) -> list[str]:
    targets = list(TARGETS)
    head = ["op", "mode", "rows", "x eager", "x compile", "x SDPA", "median % copy", *targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [
            s["op"],
            s["mode"],
            str(s["rows"]),
            fmt(s.get("geomean_x_eager"), ".2f", "x"),
            fmt(s.get("geomean_x_compile"), ".2f", "x"),
            fmt(s.get("geomean_x_sdpa"), ".2f", "x"),
            fmt(s.get("median_pct_copy"), ".0f", "%"),
        ]
        cells += [s.get(t, "") for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Speedup over each baseline against bytes moved, one panel per (op, mode); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ops = [op for op in BASELINES if any(r["op"] == op for r in rows)]
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), len(MODES), figsize=(15, 4.2 * len(ops)), squeeze=False)
    markers = {"fp16": "o", "bf16": "s", "fp32": "^"}
    colors = {"eager": "tab:blue", "compile": "tab:orange", "sdpa": "tab:green"}
    for i, op in enumerate(ops):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            for b in BASELINES[op]:
                for dtype, mk in markers.items():
                    pts = []
                    for r in sel:
                        m = r["kernel"] if r["kernel"]["times"].get("fastdiff") else r["pytest"]
                        if r["dtype"] == dtype and m["speedup"].get(b):
                            pts.append((r["bytes"], m["speedup"][b]))
                    if pts:
                        ax.scatter(
                            *zip(*pts), marker=mk, color=colors[b], alpha=0.75, s=22, label=f"x {b} {dtype}"
                        )
            for o, metric, thr in TARGETS.values():
                if o == op and metric in colors:
                    ax.axhline(thr, color=colors[metric], ls="--", lw=0.8)
            ax.axhline(1.0, color="gray", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op} {mode}", fontsize=10)
            ax.set_xlabel("bytes moved (min traffic)")
            ax.set_ylabel("speedup of fastdiff")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
        "--out-dir", type=Path, help="where to write the report (default bench/results, or a temp dir)"
    )
    p.add_argument(
        "pytest_args", nargs="*", help="extra arguments for the bench pytest run (after --), e.g. -k fp16"
    )
    args = p.parse_args(argv)

    t_start = time.time()
    deadline = t_start + args.budget

    import torch

    from bench import timing

    cuda = torch.cuda.is_available()
    size = os.environ.get("FASTDIFF_BENCH_SIZE") or ("tiny" if args.dry_run or not cuda else "full")
    info = timing.device_info()
    date = dt.date.today().isoformat()
    stem = f"{date}-{slug(info.get('gpu_name') or 'cpu')}"
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

    build = stage_build(args, workdir, deadline)
    tests = stage_tests(args, workdir, deadline)
    bench_result, records, machine = stage_bench(args, workdir, deadline, size)
    rows = build_rows(records)
    rates = dict(machine.get("fastdiff", {}))
    for r in records:
        e = r["extra_info"]
        rates.setdefault("copy_gbps", e.get("copy_gbps"))
        if e.get("matmul_tflops"):
            rates.setdefault(
                "matmul_tflops_" + {"fp16": "float16", "bf16": "bfloat16"}.get(e["dtype"], e["dtype"]),
                e["matmul_tflops"],
            )
    report = {
        "schema": 1,
        "date": date,
        "stem": stem,
        "dry_run": args.dry_run or not cuda,
        "size": size,
        "budget_s": args.budget,
        "elapsed_s": round(time.time() - t_start, 1),
        "device": info,
        "cuda_extension": build,
        "rates": {k: v for k, v in rates.items() if k.startswith(("copy", "matmul"))},
        "tests": tests,
        "bench": bench_result,
        "targets": {k: {"op": o, "metric": m, "threshold": t} for k, (o, m, t) in TARGETS.items()},
        "summary": summarise(rows),
        "rows": rows,
        "records": [r for r in records if r.get("extra_info", {}).get("op") == "sampling"],
    }
    json_path, md_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(markdown(report))
    has_plot = plot(rows, png_path, f"fastdiff speedups, {info.get('gpu_name') or 'CPU'} ({date})")
    written = [json_path, md_path] + ([png_path] if has_plot else [])

    out_env = os.environ.get("OUT")
    if out_env:
        dest = Path(out_env)
        (dest / "raw").mkdir(parents=True, exist_ok=True)
        for f in written:
            shutil.copy2(f, dest / f.name)
        for f in workdir.iterdir():
            if f.is_file() and f not in written:
                shutil.copy2(f, dest / "raw" / f.name)
        log(f"copied results to {dest}")

    log("wrote " + ", ".join(str(f) for f in written))
    print()
    print(
        f"tests: {tests.get('counts', 'skipped')}   bench: {bench_result['counts']}   "
        f"({bench_result['skipped_for_budget']} skipped for budget)   wall {time.time() - t_start:.0f}s"
    )
    print("\n".join(summary_lines(report["summary"])))
    ok = not tests.get("failed") and not bench_result["failed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
