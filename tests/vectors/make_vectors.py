#!/usr/bin/env python
"""Make reference cases by running the original guided-diffusion code, so anyone can check
fastdiff's fidelity (and CI can, from a fresh clone, with the tiny cases committed beside this).

    python tests/vectors/make_vectors.py --guided-diffusion /path/to/guided-diffusion --out tests/vectors

Each case is one ``.pt`` with the keys ../shared/vectors/README.md describes (flags, state_dict,
x/t/y/out, train, sample): random non-zero weights, one forward pass, the training losses and a
DDIM trajectory, all from the original code on the CPU in float32.

``variants.pt`` (made by the same command) covers the architecture and process options at tiny
sizes without storing weights: both sides draw them with :func:`seeded_weights`, so each case is
only its flags, inputs and outputs (see :mod:`variants`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Tiny on purpose: one UNet level at 32x32 with attention there. The committed file is the
# unconditional one (0.9 MB); a class-conditional case carries guided-diffusion's 1000-class label
# embedding (another 0.5 MB), so it is made on demand only.
CASES = {
    "tiny32_cond_eps": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1",
        attention_resolutions="32",
        num_head_channels=32,
        class_cond=True,
        learn_sigma=True,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=True,
        noise_schedule="cosine",
    ),
    "tiny32_uncond_legacy": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1",
        attention_resolutions="32",
        num_heads=2,
        class_cond=False,
        learn_sigma=False,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        noise_schedule="linear",
    ),
}


def make_case(script_util, th, overrides: dict, respacing: str = "ddim4") -> dict:
    flags = script_util.model_and_diffusion_defaults()
    flags.update(overrides)
    th.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    with th.no_grad():
        for p in model.parameters():  # every parameter fresh and non-zero (zero-init convs hide work)
            p.copy_(th.randn_like(p) * 0.1)
    model.eval()
    n, size = 1, flags["image_size"]
    y = th.randint(0, 1000, (n,)) if flags["class_cond"] else None
    kw = {"y": y} if y is not None else {}
    x, t = th.randn(n, 3, size, size), th.randint(0, 1000, (n,))
    with th.no_grad():
        out = model(x, t, **kw)
        x_start, t_train, noise = (
            th.randn(n, 3, size, size).clamp(-1, 1),
            th.randint(0, 1000, (n,)),
            th.randn(n, 3, size, size),
        )
        losses = diffusion.training_losses(model, x_start, t_train, model_kwargs=kw, noise=noise)
    spaced = script_util.create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        timestep_respacing=respacing,
    )
    x_T = th.randn(n, 3, size, size)
    trajectory = [
        o["sample"]
        for o in spaced.ddim_sample_loop_progressive(
            model, x_T.shape, noise=x_T, model_kwargs=kw, device="cpu", clip_denoised=True
        )
    ]
    case = {
        "kind": "unet",
        "flags": flags,
        "state_dict": model.state_dict(),
        "x": x,
        "t": t,
        "out": out,
        "train": {"x_start": x_start, "t": t_train, "noise": noise, **{k: v for k, v in losses.items()}},
        "sample": {
            "respacing": respacing,
            "use_timesteps": sorted(int(s) for s in spaced.use_timesteps),
            "x_T": x_T,
            "classifier_scale": 0.0,
            "method": "ddim",
            "eta": 0.0,
            "clip_denoised": True,
            "x_0": trajectory[-1],
            "trajectory": th.stack(trajectory),
        },
    }
    if y is not None:
        case["y"] = y
        case["sample"]["y"] = y
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guided-diffusion", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    sys.path.insert(0, str(args.guided_diffusion))
    import torch as th
    from guided_diffusion import script_util

    th.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in CASES.items():
        path = args.out / f"{name}.pt"
        th.save(make_case(script_util, th, overrides), path)
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")
    from variants import make_variants  # beside this file

    path = args.out / "variants.pt"
    th.save(make_variants(script_util, th), path)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
