#!/usr/bin/env python
"""The bundled default job (guided DDIM-25, classifier scale 2, 16 digits 0-9 in turn) run on
the original guided-diffusion code, as its scripts/classifier_sample.py runs it, for
bench/compare_original.py. x_T is drawn exactly as ``fastdiff sample --seed 0`` draws batch 0,
so both write the same images.

    python bench/original_sample.py --guided-diffusion /path/to/guided-diffusion --out x.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "fastdiff" / "assets" / "mnist"


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return {k: json.loads(v) for k, v in meta.items()}


def _resolutions(spec: str, image_size: int) -> tuple[int, ...]:
    return tuple(image_size // int(r) for r in str(spec).split(","))


def _mult(spec: str) -> tuple[int, ...]:
    return tuple(int(m) for m in str(spec).split(","))


def bundled_networks():
    """The bundled diffusion model and classifier as the original's UNetModel and EncoderUNetModel
    (guided_diffusion on sys.path), with the bundled weights, and their flags (for
    bench/compare_train.py too)."""
    from guided_diffusion.unet import EncoderUNetModel, UNetModel
    from safetensors.torch import load_file

    mf = _metadata(ASSETS / "diffusion.safetensors")["flags"]
    cf = _metadata(ASSETS / "classifier.safetensors")["flags"]
    size = mf["image_size"]
    model = UNetModel(
        image_size=size,
        in_channels=mf["in_channels"],
        model_channels=mf["num_channels"],
        out_channels=mf["in_channels"] * (2 if mf["learn_sigma"] else 1),
        num_res_blocks=mf["num_res_blocks"],
        attention_resolutions=_resolutions(mf["attention_resolutions"], size),
        dropout=mf["dropout"],
        channel_mult=_mult(mf["channel_mult"]),
        num_classes=mf["num_classes"] if mf["class_cond"] else None,
        num_heads=mf["num_heads"],
        num_head_channels=mf["num_head_channels"],
        num_heads_upsample=mf["num_heads_upsample"],
        use_scale_shift_norm=mf["use_scale_shift_norm"],
        resblock_updown=mf["resblock_updown"],
        use_new_attention_order=mf["use_new_attention_order"],
    )
    model.load_state_dict(load_file(str(ASSETS / "diffusion.safetensors")))
    classifier = EncoderUNetModel(
        image_size=size,
        in_channels=cf["in_channels"],
        model_channels=cf["classifier_width"],
        out_channels=cf["num_classes"],
        num_res_blocks=cf["classifier_depth"],
        attention_resolutions=_resolutions(cf["classifier_attention_resolutions"], size),
        channel_mult=_mult(cf["channel_mult"]),
        num_head_channels=64,
        use_scale_shift_norm=cf["classifier_use_scale_shift_norm"],
        resblock_updown=cf["classifier_resblock_updown"],
        pool=cf["classifier_pool"],
    )
    classifier.load_state_dict(load_file(str(ASSETS / "classifier.safetensors")))
    return model, classifier, mf, cf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--guided-diffusion", required=True, type=Path, help="a checkout of openai/guided-diffusion"
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--steps", default="ddim25")
    args = ap.parse_args()
    sys.path.insert(0, str(args.guided_diffusion))

    import numpy as np
    import torch as th
    import torch.nn.functional as F
    from guided_diffusion.script_util import create_gaussian_diffusion

    model, classifier, mf, cf = bundled_networks()
    model.eval()
    classifier.eval()
    diffusion = create_gaussian_diffusion(
        steps=mf["diffusion_steps"],
        learn_sigma=mf["learn_sigma"],
        noise_schedule=mf["noise_schedule"],
        timestep_respacing=args.steps,
    )

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * args.scale

    def model_fn(x, t, y=None):
        return model(x, t, y if mf["class_cond"] else None)

    n = args.num_samples
    shape = (n, mf["in_channels"], mf["image_size"], mf["image_size"])
    noise = th.randn(*shape, generator=th.Generator().manual_seed(0))  # fastdiff's batch 0 at seed 0
    y = th.arange(n) % cf["num_classes"]
    out = diffusion.ddim_sample_loop(
        model_fn, shape, noise=noise, clip_denoised=True, model_kwargs={"y": y}, cond_fn=cond_fn, device="cpu"
    )
    images = ((out + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    np.savez(args.out, images, y.numpy())


if __name__ == "__main__":
    main()
