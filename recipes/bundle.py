"""Copy trained weights into the package as the bundled default model (fastdiff/assets/mnist).

The diffusion checkpoint keeps its metadata (flags, null label) and gains the classifier scale
that `fastdiff sample` uses by default; both files are checked to load into their presets.

    python recipes/bundle.py runs/mnist/ema_0.999_0002000.safetensors \
        runs/mnist_classifier/model_0002000.safetensors --classifier-scale 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff.models.checkpoint import load_state_dict, load_weights, read_metadata, save_weights
from fastdiff.models.presets import build_preset
from fastdiff.runs.loading import BUNDLED_CLASSIFIER, BUNDLED_MODEL


def bundle(src: Path, dst: Path, preset: str, extra: dict) -> None:
    metadata = {**read_metadata(src), **extra}
    sd = load_state_dict(src)
    load_weights(build_preset(preset), sd, preset=preset)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_weights(sd, dst, metadata)
    print(f"{src} -> {dst} ({dst.stat().st_size / 1e6:.1f} MB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("classifier", type=Path)
    ap.add_argument("--classifier-scale", type=float, required=True)
    args = ap.parse_args()
    scale = {"default_classifier_scale": args.classifier_scale}
    bundle(args.model, BUNDLED_MODEL, "mnist", scale)
    bundle(args.classifier, BUNDLED_CLASSIFIER, "mnist-classifier", {})


if __name__ == "__main__":
    main()
