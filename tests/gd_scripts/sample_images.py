"""A sampling script in the style of guided-diffusion's image_sample.py (written for fastdiff's
tests): it only knows the ``guided_diffusion`` package, and ``fastdiff gd-run`` runs it."""

import argparse
import os

import numpy as np
import torch as th
import torch.distributed as dist
from guided_diffusion import dist_util, logger, script_util
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    logger.configure()

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    model.load_state_dict(dist_util.load_state_dict(args.model_path, map_location="cpu"))
    model.to(dist_util.dev())
    if args.use_fp16:
        model.convert_to_fp16()
    model.eval()

    th.manual_seed(args.seed + dist.get_rank())  # after building: the model's init draws too
    images, labels = [], []
    while len(images) * args.batch_size < args.num_samples:
        kwargs = {}
        if args.class_cond:
            classes = th.randint(0, script_util.NUM_CLASSES, (args.batch_size,), device=dist_util.dev())
            kwargs["y"] = classes
        loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
        sample = loop(
            model,
            (args.batch_size, 3, args.image_size, args.image_size),
            clip_denoised=args.clip_denoised,
            model_kwargs=kwargs,
        )
        sample = ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous()
        gathered = [th.zeros_like(sample) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sample)
        images.extend(s.cpu().numpy() for s in gathered)
        if args.class_cond:
            gathered = [th.zeros_like(classes) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, classes)
            labels.extend(c.cpu().numpy() for c in gathered)
        logger.logkv("samples", len(images) * args.batch_size)
        logger.dumpkvs()

    arr = np.concatenate(images)[: args.num_samples]
    if dist.get_rank() == 0:
        out_path = os.path.join(logger.get_dir(), f"samples_{'x'.join(map(str, arr.shape))}.npz")
        logger.log(f"saving to {out_path}")
        if args.class_cond:
            np.savez(out_path, arr, np.concatenate(labels)[: args.num_samples])
        else:
            np.savez(out_path, arr)
    dist.barrier()
    logger.log("sampling complete")


def create_argparser():
    defaults = dict(clip_denoised=True, num_samples=16, batch_size=4, use_ddim=False, model_path="", seed=0)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
