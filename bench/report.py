#!/usr/bin/env python
"""The GPU run's report: pytest-benchmark records -> rows of speedups and % of the hardware
limit, judged against the issue's targets, as markdown and a plot.

``bench/run_gpu.py`` writes ``<stem>.json`` (the records and what the run saw) and calls this;
``python bench/report.py bench/results/<stem>.json`` renders the ``.md`` and ``.png`` again from
that JSON alone (after a change of the report, or from a run copied off the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

# The targets: name -> (op, metric, threshold).
TARGETS = {
    ">=80% copy bw": ("ada_group_norm", "pct_copy", 80.0),
    ">=3x eager": ("ada_group_norm", "eager", 3.0),
    ">=1.3x compile": ("ada_group_norm", "compile", 1.3),
    ">=1.2x SDPA": ("attention", "sdpa", 1.2),
}
BASELINES = {
    "ada_group_norm": ("eager", "compile"),
    "attention": ("eager", "compile", "sdpa"),
    "upsample_conv": ("eager", "compile"),
}
MATMUL_OPS = ("attention", "upsample_conv")  # rows that report TFLOP/s and % of the matmul rate
MODES = ("fwd", "bwd", "dx", "fwdbwd")  # dx: the input gradient alone (guidance)
DTYPES = ("fp16", "bf16", "fp32")


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
        elif op == "upsample_conv":
            shape = f"{any_e['channels']}x{any_e['resolution']}x{any_e['resolution']} -> 2x"
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
    order = {op: i for i, op in enumerate(BASELINES)}
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
    if op in MATMUL_OPS:
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
        if op in MATMUL_OPS:
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
    if report.get("command"):
        md.append(f"- command: `{report['command']}`")
    if not d.get("cuda_available"):
        md.append(f"- CPU threads per benchmark process: {d.get('bench_threads')} (FASTDIFF_BENCH_THREADS)")
    if report.get("complete") is False:  # run_gpu.py's JSON of a run cut short
        md.append("- **incomplete**: the run ended before its last stage finished")
    ext = report["cuda_extension"]
    if ext:
        md.append(f"- CUDA extension (csrc/): {ext['status']} ({ext['seconds']}s)")
    t = report["tests"]
    if t is None:
        md.append("- GPU tests: not run")
    elif not t.get("skipped"):
        md.append(
            f"- GPU tests (`pytest tests -m gpu`): {t['counts']}" + (" TIMED OUT" if t["timed_out"] else "")
        )
        md += [f"  - failed: `{n}`" for n in t["failed"][:20]]
    b = report["bench"]
    if b is None:
        md.append("- benchmarks: not run")
    else:
        md.append(
            f"- benchmarks: {b['counts']}, {b['records']} timed; {b['skipped_for_budget']} skipped for "
            "the time budget" + (" TIMED OUT" if b["timed_out"] else "")
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
        "measured `y.copy_(x)` bandwidth. upsample_conv's TFLOP/s counts the 3x3 conv at the output "
        "size that guided-diffusion runs, for every implementation. Targets are judged on the kernel "
        "timer when it timed both sides, else on the pytest-benchmark median.",
        "",
    ]
    return "\n".join(md)


FASTDIFF_ENGINES = ("eager", "parallel", "compile", "graph", "graph-loop")  # parallel: CPU, >= 2 threads
SAMPLING_IMPLS = ("gd", "gd-compile", "gd-sdpa", "gd-xformers", *FASTDIFF_ENGINES)


def sampling_lines(records: list[dict]) -> list[str]:
    """bench/test_bench_sampling.py: seconds per implementation, the best fastdiff engine's speedup
    over guided-diffusion's semantics, its torch.compile and its best fused-attention variant
    (SDPA or xformers), and the issue's targets (guided loop at
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
        "x gd-sdpa/xformers",
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
        fused = [times[k] for k in ("gd-sdpa", "gd-xformers") if k in times]
        x_fused = _ratio(min(fused), fast) if fused else None
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
                    fmt(x_fused),
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


def render(report: dict, json_path: Path) -> list[Path]:
    """Write the report's markdown (and plot, where matplotlib is installed) beside its JSON."""
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(report), encoding="utf-8")  # its dashes, whatever the locale
    gpu = report["device"].get("gpu_name") or "CPU"
    has_plot = plot(report["rows"], png_path, f"fastdiff speedups, {gpu} ({report['date']})")
    return [md_path] + ([png_path] if has_plot else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="a <stem>.json that bench/run_gpu.py wrote")
    args = p.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    report["summary"] = summarise(report["rows"])  # the judging as it stands now
    print("wrote " + ", ".join(str(f) for f in render(report, args.report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
