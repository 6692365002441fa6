#!/usr/bin/env python
"""End to end on the CPU, as a user runs it: the default ``fastdiff sample`` (bundled model,
guided DDIM-25, 16 digits) against the same job on the original guided-diffusion code
(bench/original_sample.py), from process start to files written, same threads (or each side's
own default), same images.

    python bench/compare_original.py --guided-diffusion /path/to/guided-diffusion [--threads 1 2 default]
    python bench/compare_original.py --guided-diffusion PATH --threads default --busy 1 --tag busy1
    python bench/compare_original.py --guided-diffusion PATH --dtypes fp32 bf16 --tag bf16

Each side runs ``--rounds`` times in alternation (so machine noise hits both); the report
(bench/results/<date>-cpu-e2e.{json,md}) gives the median wall and CPU seconds, the ratio
original / fastdiff, and the largest difference between the two sets of uint8 images with their
PSNR (``--dtypes``: fastdiff's ``--dtype``; only fp32 gives the original's samples, the others
are measured against them).
``--busy N`` keeps N other processes spinning for the whole measurement: the shared machine a
user often samples on, where each side's own default thread count decides how it fares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import machine_info, write_record  # noqa: E402


def _timed(cmd: list[str], threads: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one child process; ``threads`` "default" leaves each side to choose."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
        if threads != "default":
            env[var] = threads
    env.pop("TRITON_INTERPRET", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@contextlib.contextmanager
def _busy(n: int):
    """n spinning processes (other users' work) for the duration, then ended. The runs start
    once the 1-minute load average counts them (at most 90 s): a machine that has been busy for
    a while, as fastdiff's default thread count reads it."""
    spin = [sys.executable, "-c", "while True: pass"]
    procs = [subprocess.Popen(spin) for _ in range(n)]
    try:
        deadline = time.monotonic() + 90
        while procs and os.getloadavg()[0] < n - 0.5 and time.monotonic() < deadline:
            time.sleep(1)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _psnr(ours: np.ndarray, theirs: np.ndarray) -> float | None:
    """dB over the uint8 images; None where they are the same."""
    mse = float(np.mean((ours - theirs) ** 2))
    return None if mse == 0 else 10 * math.log10(255**2 / mse)


def _compare(args, tmp: Path, fastdiff: str, threads: str, engine: str, dtype: str) -> dict:
    """One row: ``--rounds`` alternating runs of each side at ``threads``."""
    times: dict[str, list[tuple[float, float]]] = {"fastdiff": [], "original": []}
    flags = [] if engine == "default" else ["--engine", engine]
    flags += [] if dtype == "fp32" else ["--dtype", dtype]
    for r in range(args.rounds):
        out = tmp / f"fd-{threads}-{engine}-{dtype}-{r}"
        cmd = [fastdiff, "sample", "--out", str(out), "--no-progress", *flags]
        cmd += [] if threads == "default" else ["--threads", threads]
        times["fastdiff"].append(_timed(cmd, threads))
        original = [
            sys.executable,
            str(REPO / "bench" / "original_sample.py"),
            "--guided-diffusion",
            str(args.guided_diffusion),
            "--out",
            str(tmp / "orig.npz"),
        ]
        times["original"].append(_timed(original, threads))
    ours = np.load(out / "samples_16x32x32x1.npz")["arr_0"].astype(int)
    theirs = np.load(tmp / "orig.npz")["arr_0"].astype(int)
    diff = np.abs(ours - theirs)
    row = {
        "threads": threads,
        "engine": json.loads((out / "run.json").read_text())["engine"],
        "dtype": dtype,
        "rounds": args.rounds,
        "max_level_diff": int(diff.max()),
        "mean_level_diff": float(diff.mean()),
        "psnr_db": _psnr(ours, theirs),
    }
    for side, ts in times.items():
        row[f"{side}_wall_s"] = statistics.median(t[0] for t in ts)
        row[f"{side}_cpu_s"] = statistics.median(t[1] for t in ts)
    row["speedup_wall"] = row["original_wall_s"] / row["fastdiff_wall_s"]
    row["speedup_cpu"] = row["original_cpu_s"] / row["fastdiff_cpu_s"]
    return row


def _count(minimum: int, *words: str):
    """An argparse type: a whole number >= minimum, or one of ``words`` (then kept as text, as the
    children's command lines and environments take it), so a typo stops before any run."""

    def parse(text: str):
        if text in words or (text.isdigit() and int(text) >= minimum):
            return text if words else int(text)
        alternatives = "".join(f" or {w!r}" for w in words)
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}{alternatives}, got {text!r}")

    return parse


def main(argv=None) -> None:
    from fastdiff.engines import ENGINES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guided-diffusion", required=True, type=Path)
    ap.add_argument(
        "--threads",
        nargs="+",
        type=_count(1, "default"),
        default=["1"],
        help="thread counts, both sides; 'default' runs each as a user would (no OMP_NUM_THREADS)",
    )
    ap.add_argument("--rounds", type=_count(1), default=3)
    ap.add_argument("--tag", default="", help="report name suffix: <date>-cpu-e2e-TAG")
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["default"],
        choices=["default", *ENGINES],
        help="fastdiff engines to time ('default': no --engine, what a user gets)",
    )
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16", "fp16"],
        help="fastdiff's --dtype (fp32: the original's samples; the others are compared with them)",
    )
    ap.add_argument(
        "--busy",
        type=_count(0),
        default=0,
        help="other processes kept spinning during the runs (a loaded machine)",
    )
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if not (args.guided_diffusion / "guided_diffusion" / "unet.py").is_file():
        sys.exit(f"error: {args.guided_diffusion} is not a guided-diffusion checkout")
    fastdiff = shutil.which("fastdiff") or sys.exit("error: the fastdiff command is not installed")

    rows = []
    with tempfile.TemporaryDirectory() as tmp, _busy(args.busy):
        for threads in args.threads:
            for engine in args.engines:
                for dtype in args.dtypes:
                    rows.append(_compare(args, Path(tmp), fastdiff, threads, engine, dtype))
                    print(json.dumps(rows[-1]), flush=True)

    info = machine_info(load_1min=os.getloadavg()[0], busy_processes=args.busy)
    lines = [
        f"# End to end on the CPU: `fastdiff sample` vs guided-diffusion ({info['date']})",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, 1-min load at the end "
        f"{info['load_1min']:.2f}. Command: `python bench/compare_original.py --guided-diffusion PATH "
        f"--threads {' '.join(map(str, args.threads))} --engines {' '.join(args.engines)} "
        f"--dtypes {' '.join(args.dtypes)} --rounds {args.rounds}"
        f"{f' --busy {args.busy}' if args.busy else ''}`. "
        + (f"{args.busy} other process(es) kept a core busy each throughout. " if args.busy else "")
        + "Job: the bundled model, "
        "guided DDIM-25 (classifier scale 2), 16 images, process start to files written; medians.",
        "",
        "| threads | engine | dtype | fastdiff wall s | original wall s | x wall | fastdiff CPU s "
        "| original CPU s | x CPU | max / mean image diff (of 255) | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['engine']} | {r['dtype']} | {r['fastdiff_wall_s']:.2f} | "
            f"{r['original_wall_s']:.2f} | {r['speedup_wall']:.2f} | {r['fastdiff_cpu_s']:.2f} | "
            f"{r['original_cpu_s']:.2f} | {r['speedup_cpu']:.2f} | "
            f"{r['max_level_diff']} / {r['mean_level_diff']:.4f} | "
            + ("same" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}")
            + " |"
        )
    write_record(args.out_dir, "cpu-e2e", {"machine": info, "rows": rows}, lines, args.tag)


if __name__ == "__main__":
    main()
