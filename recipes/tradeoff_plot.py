"""The fidelity/diversity trade-off of guidance for the bundled model, from evaluate_bundled.py's
numbers: FID (on the MNIST CNN's features), precision and recall against the classifier scale s
and the classifier-free weight w (one sampler, default DDIM-25).

    python recipes/evaluate_bundled.py --samplers DDIM-25 --scales 0,1,2,4,8 --cfg-scales 1,2,4 \\
        --num-samples 100 --batch-size 100 --out recipes/eval_metrics.json
    python recipes/tradeoff_plot.py recipes/eval_metrics.json --out recipes/logs/guidance_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastdiff.files import atomic_write  # noqa: E402


def series(rows: list[dict], prefix: str) -> list[tuple[float, dict]]:
    """(scale, row) for guidance names like 'classifier s=2' / 'CFG w=2', by scale."""
    out = [(float(r["guidance"].split("=")[1]), r) for r in rows if r["guidance"].startswith(prefix)]
    return sorted(out, key=lambda t: t[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--sampler", default="DDIM-25")
    ap.add_argument("--out", type=Path, default=Path("recipes/logs/guidance_tradeoff.png"))
    args = ap.parse_args()
    rows = [r for r in json.loads(args.results.read_text()) if r["sampler"] == args.sampler]
    panels = [("classifier s=", "classifier scale s"), ("CFG w=", "classifier-free weight w")]
    panels = [(p, label, series(rows, p)) for p, label in panels if series(rows, p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (_, label, pts) in zip(axes[0], panels):
        x = [s for s, _ in pts]
        ax.plot(x, [r["frechet_distance"] for _, r in pts], "o-", color="C3", label="FID (CNN features)")
        ax.set_xlabel(label)
        ax.set_ylabel("FID (lower is better)", color="C3")
        twin = ax.twinx()
        twin.plot(x, [r["precision"] for _, r in pts], "s--", color="C0", label="precision")
        twin.plot(x, [r["recall"] for _, r in pts], "^--", color="C2", label="recall")
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("precision / recall")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower left")
        n = sorted({r["num_samples"] for _, r in pts})
        ax.set_title(f"{args.sampler}, n={'/'.join(map(str, n))} per point", fontsize=9)
    fig.tight_layout()
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    print(args.out)


if __name__ == "__main__":
    main()
