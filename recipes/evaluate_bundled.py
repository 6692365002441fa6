"""Measure the bundled MNIST model's samples with the independent CNN (recipes/README.md).

For each sampler and guidance setting: the fraction of samples the CNN reads as the requested
digit (class match) and what `fastdiff evaluate mnist SAMPLES.npz` reports against the held-out
digits on the CNN's features (FID = the Frechet distance, sFID, IS, precision, recall). Samples
are quantised to uint8 exactly as `fastdiff sample` saves them.

    python recipes/evaluate_bundled.py --num-samples 100 --out recipes/eval.json  # DDPM-250: 50
    python recipes/evaluate_bundled.py --table     # the README's markdown table from eval.json
    python recipes/evaluate_bundled.py --metrics-table --out recipes/eval_metrics.json

Settings already in --out are skipped, so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fastdiff.diffusion import sample
from fastdiff.evaluation.networks import BUNDLED_CNN, load_mnist_features
from fastdiff.evaluation.npz import from_array
from fastdiff.evaluation.scores import evaluate
from fastdiff.files import to_uint8
from fastdiff.runs.loading import BUNDLED_CLASSIFIER, BUNDLED_MODEL, load_classifier, load_diffusion_model
from fastdiff.runs.plan import respacing_for
from fastdiff.training.data import get_mnist

HERE = Path(__file__).resolve().parent
SAMPLERS = {
    "DDIM-25": ("ddim", 25),
    "DDPM-250": ("ddpm", 250),
    "DPM++-10": ("dpm++2m", 10),
    "DPM++-20": ("dpm++2m", 20),
}


def guidance_settings(scales, cfg_scales):
    return [(f"classifier s={s:g}", {"classifier_scale": s}) for s in scales] + [
        (f"CFG w={w:g}", {"cfg_scale": w}) for w in cfg_scales
    ]


def markdown_table(results: list[dict]) -> str:
    """One row per sampler, one column per guidance setting: class match / Frechet distance."""
    columns = list(dict.fromkeys(r["guidance"] for r in results))
    rows = list(dict.fromkeys(r["sampler"] for r in results))
    cell = {(r["sampler"], r["guidance"]): r for r in results}
    lines = ["| sampler | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in rows:
        sizes = sorted({r["num_samples"] for (s, _), r in cell.items() if s == name})
        texts = [
            f"{cell[name, g]['class_match']:.1%} / {cell[name, g]['frechet_distance']:.0f}"
            if (name, g) in cell
            else "–"
            for g in columns
        ]
        lines.append(f"| {name} (n={'/'.join(map(str, sizes))}) | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def metrics_table(results: list[dict]) -> str:
    """One row per (sampler, guidance): everything `fastdiff evaluate mnist` reports."""
    lines = [
        "| sampler, guidance | n | class match | FID | sFID | IS | precision | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "precision" in r:
            lines.append(
                f"| {r['sampler']}, {r['guidance']} | {r['num_samples']} | {r['class_match']:.0%} | "
                f"{r['frechet_distance']:.1f} | {r['sfid']:.1f} | {r['inception_score']:.2f} | "
                f"{r['precision']:.2f} | {r['recall']:.2f} |"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    ap.add_argument("--classifier", type=Path, default=BUNDLED_CLASSIFIER)
    ap.add_argument("--cnn", type=Path, default=BUNDLED_CNN)
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--scales", default="0,1,2,4")
    ap.add_argument("--cfg-scales", default="2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "eval.json")
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table and exit")
    ap.add_argument("--metrics-table", action="store_true", help="the same with all metrics, one row each")
    args = ap.parse_args()
    if args.table or args.metrics_table:
        results = json.loads(args.out.read_text())
        print(metrics_table(results) if args.metrics_table else markdown_table(results))
        return

    device = torch.device("cpu")
    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=args.model, device=device)
    clf = load_classifier(args.classifier, preset=None, flag_string=None, image_size=32, device=device)
    net = load_mnist_features(args.cnn)
    val = get_mnist("val")
    reference = from_array(val.images, "held-out digits", val.labels)
    labels = torch.arange(args.num_samples) % 10
    scales = [float(s) for s in args.scales.split(",") if s]
    cfg = [float(s) for s in args.cfg_scales.split(",") if s]
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["sampler"], r["guidance"]) for r in results}
    for name in args.samplers.split(","):
        method, steps = SAMPLERS[name]
        diffusion = loaded.diffusion(respacing_for(method, steps, None, loaded.num_timesteps))
        for guidance, kw in guidance_settings(scales, cfg):
            if (name, guidance) in done:
                continue
            start = time.perf_counter()
            images = []
            for b, lo in enumerate(range(0, args.num_samples, args.batch_size)):
                y = labels[lo : lo + args.batch_size]
                g = torch.Generator().manual_seed(args.seed * 1000 + b)
                x = sample(
                    diffusion,
                    loaded.model,
                    (len(y), 1, 32, 32),
                    sampler=method,
                    model_kwargs={"y": y},
                    classifier=clf.model,
                    null_label=loaded.null_label,
                    generator=g,
                    **kw,
                )
                images.append(to_uint8(x))
            images = np.concatenate(images)
            scores = evaluate(reference, from_array(images, name, labels.numpy()), net).to_dict()
            row = {
                "sampler": name,
                "guidance": guidance,
                "frechet_distance": scores["fid"],
                **{k: scores[k] for k in ("class_match", "sfid", "inception_score", "precision", "recall")},
                "num_samples": args.num_samples,
                "seconds": time.perf_counter() - start,
            }
            print(json.dumps(row), flush=True)
            results.append(row)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
